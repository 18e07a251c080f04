//! `flowwarden datapath`: show or switch the kernel programs' mode, or remove them.

use std::path::PathBuf;

use super::{
    output::{self, outln},
    socket::{SocketArg, fail},
};
use crate::{
    api::{answers::ModeName, request::DatapathMode},
    config::DEFAULT_PIN_DIR,
};

/// A mode as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModeArg {
    /// Drop what has no grant.
    Enforce,
    /// Count what would be dropped, drop nothing.
    Monitor,
}

impl From<ModeArg> for ModeName {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Enforce => Self::Enforce,
            ModeArg::Monitor => Self::Monitor,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum DatapathCommand {
    /// Show the mode, or switch it: `enforce` drops, `monitor` only counts what it would drop.
    Mode {
        #[arg(value_enum)]
        mode: Option<ModeArg>,
        #[arg(long)]
        json: bool,
    },
    /// Detach the programs and remove every pinned map and link. Enforcement stops.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

impl DatapathCommand {
    pub fn json(&self) -> bool {
        match self {
            Self::Mode { json, .. } => *json,
            Self::Detach { .. } => false,
        }
    }
}

pub fn run(socket: &SocketArg, command: DatapathCommand) -> anyhow::Result<()> {
    match command {
        DatapathCommand::Mode { mode, json } => {
            let v = socket
                .connect()?
                .datapath_mode(&DatapathMode {
                    mode: mode.map(Into::into),
                })
                .map_err(fail)?;
            if json {
                return output::json(&v);
            }
            outln!("datapath mode: {}", v.mode)
        }
        DatapathCommand::Detach { pin_dir } => {
            let removed = crate::datapath::detach_all(&pin_dir)?;
            if removed.is_empty() {
                return outln!(
                    "nothing pinned under {}: nothing to detach",
                    pin_dir.display()
                );
            }
            for path in &removed {
                outln!("removed {}", path.display())?;
            }
            outln!("datapath detached: traffic to resources is no longer enforced")
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(subcommand)]
        c: DatapathCommand,
    }

    #[test]
    fn modes_are_a_closed_set() {
        let Cli { c } = Cli::try_parse_from(["x", "mode", "monitor"]).unwrap();
        assert!(matches!(
            c,
            DatapathCommand::Mode {
                mode: Some(ModeArg::Monitor),
                ..
            }
        ));
        assert_eq!(ModeName::from(ModeArg::Enforce), ModeName::Enforce);
        let e = Cli::try_parse_from(["x", "mode", "off"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("enforce") && e.contains("monitor"), "{e}");
    }
}
