//! The daemon's TOML configuration (`agent.toml`), with defaults that run out of the box.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flowwarden/agent.toml";
/// Where maps and links are pinned, so enforcement outlives the agent process.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowwarden";
pub const DEFAULT_POLICY_DIR: &str = "/etc/flowwarden/policies";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Interfaces whose traffic is enforced. Required: the agent never guesses.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Where ingress is checked: XDP (fastest) or TC (where XDP is not available).
    #[serde(default)]
    pub ingress: IngressHook,
    #[serde(default)]
    pub xdp_mode: XdpModeChoice,
    /// `enforce` drops; `monitor` only counts what would be dropped.
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Flows the kernel can hold; when full, new flows to resources are denied.
    /// Takes effect when the maps are created (after `datapath detach`).
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            ingress: IngressHook::default(),
            xdp_mode: XdpModeChoice::default(),
            mode: Mode::default(),
            pin_dir: default_pin_dir(),
            flow_table_size: default_flow_table_size(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (`*.toml`); relative paths are taken from the config's directory.
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: default_policy_dir(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IngressHook {
    #[default]
    Xdp,
    Tc,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpModeChoice {
    /// Driver mode, falling back (with a warning) to generic mode.
    #[default]
    Auto,
    Driver,
    Generic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from(DEFAULT_POLICY_DIR)
}

fn default_flow_table_size() -> u32 {
    agent_common::map_sizes::FLOWS
}

impl Config {
    /// Reads and validates a config file; relative paths inside it are resolved against the
    /// file's directory.
    ///
    /// # Errors
    /// The file cannot be read, is not valid TOML, has unknown keys or out-of-range values.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        if config.policy.dir.is_relative() {
            config.policy.dir = base.join(&config.policy.dir);
        }
        Ok(config)
    }

    /// Parses config text; `path` only names the file in errors.
    ///
    /// # Errors
    /// Invalid TOML, unknown keys, or out-of-range values.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem,
        };
        let size = self.datapath.flow_table_size;
        if !(1_024..=16_777_216).contains(&size) {
            return Err(invalid(
                "datapath.flow_table_size",
                format!("{size} is out of range: use 1024 to 16777216"),
            ));
        }
        for name in &self.datapath.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    "datapath.interfaces",
                    format!(
                        "{name:?} is not an interface name (1 to 15 characters, no '/' or spaces)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_safe_defaults() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.datapath.mode, Mode::Enforce);
        assert_eq!(c.datapath.ingress, IngressHook::Xdp);
        assert_eq!(c.datapath.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.policy.dir, PathBuf::from(DEFAULT_POLICY_DIR));
        assert!(c.datapath.interfaces.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::parse(
            "[datapath]\ninterfaces = []\nmod = 'x'\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a.toml"), "{err}");
        assert!(err.contains("mod"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = Config::parse("[datapath]\nflow_table_size = 3\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("datapath.flow_table_size"), "{err}");
        let err = Config::parse("[datapath]\nmode = 'open'\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("enforce") && err.contains("monitor"), "{err}");
    }

    #[test]
    fn relative_policy_dir_is_taken_from_the_config_directory() {
        let dir = std::env::temp_dir().join(format!("fw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "[policy]\ndir = 'policies'\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.policy.dir, dir.join("policies"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
