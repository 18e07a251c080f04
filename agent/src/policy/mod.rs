//! Policy files: the protected resources (and, in the sessions issue, the rules that grant them).

mod resource;

pub use resource::{Protocol, Resource, ResourceTable, load_resources, parse_resources};

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory {path}: {source}")]
    ReadDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read policy file {path}: {source}")]
    ReadFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// `location` is `file:line` when the line is known.
    #[error("{location}: {field}: {problem}")]
    Invalid {
        location: String,
        field: String,
        problem: String,
    },
}
