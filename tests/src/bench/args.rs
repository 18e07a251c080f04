//! The arguments every benchmark takes (`--out`, `--runs`, `--repeat`), parsed with clap; each
//! bench says what its runs and repeats are, and their defaults, in one [`Spec`].

use std::path::{Path, PathBuf};

use clap::{ArgMatches, Parser};

/// What `--runs` or `--repeat` means to one benchmark.
#[derive(Clone, Copy, Debug)]
pub enum Knob {
    /// Used: its help line and its default.
    Means { help: &'static str, default: usize },
    /// Not used by this bench (`cargo xtask bench` may forward it to any bench): accepted,
    /// hidden from the help, and named as ignored, with why.
    Ignored(&'static str),
}

/// A benchmark's name (its report is `target/bench/NAME.json` by default) and what its
/// `--runs` and `--repeat` mean.
#[derive(Clone, Copy, Debug)]
pub struct Spec {
    pub name: &'static str,
    pub runs: Knob,
    pub repeat: Knob,
}

/// The common arguments; a bench's own `Parser` takes them with `#[command(flatten)]` and is
/// parsed with [`parse`].
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Where the JSON report goes.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// How many times the measurement is taken (see the bench's own meaning above).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    runs: Option<usize>,
    /// How large one measurement is (see the bench's own meaning above).
    #[arg(long, value_name = "N", value_parser = at_least_one)]
    repeat: Option<usize>,
    #[arg(skip)]
    spec: Option<Spec>,
}

fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

/// Something that holds the common arguments, so that [`parse`] can finish them.
pub trait HasBenchArgs {
    fn bench_args(&mut self) -> &mut BenchArgs;
}

/// Parses this process's arguments into the bench's `C`, with `--out`, `--runs` and
/// `--repeat` described and defaulted as `spec` says. Exits with clap's usage message on bad
/// input, as any command line tool does.
pub fn parse<C: Parser + HasBenchArgs>(spec: Spec) -> C {
    match try_parse_from(spec, std::env::args_os()) {
        Ok(c) => c,
        Err(e) => e.exit(),
    }
}

/// [`parse`] over given arguments (the first is the program name).
///
/// # Errors
/// The arguments do not parse.
pub fn try_parse_from<C, I, T>(spec: Spec, args: I) -> Result<C, clap::Error>
where
    C: Parser + HasBenchArgs,
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let default_out = format!("target/bench/{}.json", spec.name);
    // The last of a repeated argument counts, as xtask expects: it passes its own `--out`
    // (and `--runs`, `--repeat`) before the ones given after `--`.
    let mut cmd = C::command()
        .name(format!("bench-{}", spec.name))
        .args_override_self(true)
        .mut_arg("out", |a| a.default_value(default_out));
    for (id, knob) in [("runs", spec.runs), ("repeat", spec.repeat)] {
        cmd = cmd.mut_arg(id, |a| match knob {
            Knob::Means { help, default } => a.help(help).default_value(default.to_string()),
            Knob::Ignored(_) => a.hide(true),
        });
    }
    let mut matches: ArgMatches = cmd.try_get_matches_from(args)?;
    let mut c = C::from_arg_matches_mut(&mut matches)?;
    let common = c.bench_args();
    common.spec = Some(spec);
    for (flag, knob, given) in [
        ("--runs", spec.runs, common.runs),
        ("--repeat", spec.repeat, common.repeat),
    ] {
        if let (Knob::Ignored(why), Some(n)) = (knob, given) {
            eprintln!("{flag} {n}: ignored, {why}");
        }
    }
    Ok(c)
}

impl BenchArgs {
    /// Where the report goes.
    pub fn out(&self) -> &Path {
        self.out
            .as_deref()
            .expect("--out has a default once parsed")
    }

    /// `--runs`, or the bench's default.
    ///
    /// # Panics
    /// The bench's [`Spec`] says it ignores `--runs`: asking for it is a bug of the bench.
    pub fn runs(&self) -> usize {
        self.knob("--runs", self.runs, |s| s.runs)
    }

    /// `--repeat`, or the bench's default.
    ///
    /// # Panics
    /// As for [`BenchArgs::runs`].
    pub fn repeat(&self) -> usize {
        self.knob("--repeat", self.repeat, |s| s.repeat)
    }

    fn knob(&self, flag: &str, given: Option<usize>, which: fn(&Spec) -> Knob) -> usize {
        let spec = self.spec.as_ref().expect("parsed with bench::args::parse");
        match which(spec) {
            Knob::Means { default, .. } => given.unwrap_or(default),
            Knob::Ignored(_) => panic!("bench-{} reads {flag}, which its Spec ignores", spec.name),
        }
    }

    /// Writes `report` as pretty JSON to [`BenchArgs::out`] (creating its directory) and says
    /// where.
    ///
    /// # Errors
    /// The file cannot be written.
    pub fn write_report(&self, report: &impl serde::Serialize) -> anyhow::Result<()> {
        super::write_json(self.out(), report)?;
        println!("wrote {}", self.out().display());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(flatten)]
        common: BenchArgs,
        #[arg(long, default_value_t = 4)]
        clients: usize,
    }

    impl HasBenchArgs for Cli {
        fn bench_args(&mut self) -> &mut BenchArgs {
            &mut self.common
        }
    }

    const SPEC: Spec = Spec {
        name: "example",
        runs: Knob::Means {
            help: "Rounds; the median is reported",
            default: 3,
        },
        repeat: Knob::Ignored("one change per run"),
    };

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        try_parse_from(
            SPEC,
            std::iter::once("bench-example").chain(args.iter().copied()),
        )
    }

    #[test]
    fn defaults_come_from_the_spec() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.common.out(), Path::new("target/bench/example.json"));
        assert_eq!(c.common.runs(), 3);
        assert_eq!(c.clients, 4);
    }

    #[test]
    fn given_values_win_and_the_last_out_counts() {
        // xtask puts its own --out first; one among the bench's arguments comes later.
        let c = parse(&["--out", "a.json", "--runs", "7", "--out", "b.json"]).unwrap();
        assert_eq!(c.common.out(), Path::new("b.json"));
        assert_eq!(c.common.runs(), 7);
    }

    #[test]
    fn an_ignored_knob_is_accepted_and_bad_values_refused() {
        assert!(parse(&["--repeat", "5"]).is_ok());
        let zero = parse(&["--runs", "0"]).unwrap_err().to_string();
        assert!(zero.contains("at least 1"), "{zero}");
        let unknown = parse(&["--sessions", "5"]).unwrap_err();
        assert_eq!(unknown.kind(), clap::error::ErrorKind::UnknownArgument);
    }

    #[test]
    fn help_says_what_this_bench_means() {
        let shown = parse(&["--help"]).unwrap_err().to_string();
        assert!(shown.contains("Rounds; the median is reported"), "{shown}");
        assert!(shown.contains("[default: 3]"), "{shown}");
        assert!(
            !shown.contains("--repeat"),
            "an ignored knob is shown: {shown}"
        );
    }
}
