//! BPF_PROG_TEST_RUN on synthetic frames, for the verdict tests and the datapath benchmark.

use std::time::Duration;

use agent_common::{FlowKey, program_names};
use aya::{
    Ebpf,
    maps::HashMap,
    programs::{SchedClassifier, TestRun, TestRunOptions, Xdp},
};

use super::{DatapathError, attach::program as loaded_program};

/// What the program returned and how long one run took on average.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestRunOutcome {
    pub return_value: u32,
    pub duration: Duration,
}

pub(super) fn run(
    ebpf: &mut Ebpf,
    name: &'static str,
    frame: &[u8],
    repeat: u32,
) -> Result<TestRunOutcome, DatapathError> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..TestRunOptions::default()
    };
    let err = |source| DatapathError::Program {
        name,
        source: Box::new(source),
    };
    let result = if name == program_names::TC_INGRESS || name == program_names::TC_EGRESS {
        let prog: &mut SchedClassifier = loaded_program(ebpf, name)?;
        prog.test_run(opts).map_err(err)?
    } else {
        let prog: &mut Xdp = loaded_program(ebpf, name)?;
        prog.test_run(opts).map_err(err)?
    };
    Ok(TestRunOutcome {
        return_value: result.return_value,
        duration: result.duration,
    })
}

pub(super) fn prime_bench_floor(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let map = ebpf.map_mut("FW_BENCH").ok_or(DatapathError::MissingMap {
        name: "FW_BENCH",
        pin_dir: Default::default(),
    })?;
    let mut map: HashMap<_, FlowKey, u64> =
        HashMap::try_from(map).map_err(|source| DatapathError::Map {
            name: "FW_BENCH",
            action: "open",
            source: Box::new(source),
        })?;
    map.insert(FlowKey::default(), 0, 0)
        .map_err(|source| DatapathError::Map {
            name: "FW_BENCH",
            action: "insert",
            source: Box::new(source),
        })
}
