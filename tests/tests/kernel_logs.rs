//! Kernel log records (aya-log): the real programs, run with BPF_PROG_TEST_RUN, write them for
//! rare events only, and the datapath hands them to the `log` facade under
//! `flowwarden::kernel`. The agent's own bridge into `tracing` is tested in agent_logs.rs.

use std::{
    net::IpAddr,
    sync::{Mutex, Once},
};

use agent_common::{
    kernel_log::TARGET,
    program_names::{TC_EGRESS, TC_INGRESS, XDP_INGRESS},
};
use flowwarden::{
    config::Mode,
    datapath::{Datapath, LoadOptions},
};
use flowwarden_tests::{
    frames::{Frame, TCP_ACK, truncate},
    loaded::LoadedDatapath,
    privileged::require_root,
};
use log::{Level, LevelFilter};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_SHOT: u32 = 2;

const CLIENT: &str = "192.0.2.10";
const SERVER: &str = "10.9.0.2";
/// Its first hex digit is zero: the record must still show all 16 digits, as the CLI does.
const SESSION: u64 = 0x0e55_1000_0000_00a1;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A record as the `log` facade received it.
#[derive(Debug, Clone)]
struct Rec {
    level: Level,
    message: String,
}

static RECORDS: Mutex<Vec<Rec>> = Mutex::new(Vec::new());

/// Keeps what the kernel logged (aya's own records, under other targets, are left out).
struct Capture;

impl log::Log for Capture {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        if record.target() == TARGET {
            RECORDS.lock().unwrap().push(Rec {
                level: record.level(),
                message: record.args().to_string(),
            });
        }
    }

    fn flush(&self) {}
}

/// Installs the capture (once per process) at `level`, which the next load passes on to
/// the programs, and pins this thread to its CPU: the programs pace their records per CPU.
fn capture(level: LevelFilter) {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| log::set_logger(&Capture).expect("no other logger in this test binary"));
    log::set_max_level(level);
    RECORDS.lock().unwrap().clear();
    // SAFETY: sched_getcpu has no arguments; sched_setaffinity reads the set we own.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu failed");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set),
            0,
            "pinning the test thread to CPU {cpu}"
        );
    }
}

/// The kernel's records so far, read out of the ring buffer.
fn drain(datapath: &mut Datapath) -> Vec<Rec> {
    datapath.kernel_log.flush();
    std::mem::take(&mut *RECORDS.lock().unwrap())
}

fn run(dp: &mut LoadedDatapath, program: &'static str, frame: &[u8], repeat: u32) -> u32 {
    dp.datapath
        .test_run(program, frame, repeat)
        .unwrap_or_else(|e| panic!("test run of {program}: {e}"))
        .return_value
}

/// A TCP packet to ssh whose TCP header is cut short.
fn malformed() -> Vec<u8> {
    truncate(
        Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22).build(),
        14 + 20 + 8,
    )
}

#[test]
fn a_malformed_packet_is_logged_once_a_minute_per_cpu() {
    if !require_root("a_malformed_packet_is_logged_once_a_minute_per_cpu") {
        return;
    }
    capture(LevelFilter::Info);
    let frame = malformed();
    let mut dp = LoadedDatapath::new("klog-malformed");
    assert_eq!(run(&mut dp, XDP_INGRESS, &frame, 1), XDP_DROP);
    let records = drain(&mut dp.datapath);
    assert_eq!(
        records.len(),
        1,
        "one record for the first drop: {records:?}"
    );
    assert_eq!(records[0].level, Level::Warn);
    // test_run gives the packet the loopback interface.
    let expected =
        "dropped a malformed packet on ifindex 1 (42 bytes): its IP/TCP/UDP headers do not parse";
    assert!(
        records[0].message.starts_with(expected),
        "expected {expected:?}…, got {:?}",
        records[0].message
    );

    // Every later one is counted, not logged: the same CPU, well within the minute.
    assert_eq!(run(&mut dp, XDP_INGRESS, &frame, 100), XDP_DROP);
    assert_eq!(run(&mut dp, TC_INGRESS, &frame, 1), TC_ACT_SHOT);
    let records = drain(&mut dp.datapath);
    assert!(
        records.is_empty(),
        "logged again within the minute: {records:?}"
    );
    assert_eq!(
        dp.counters()
            .dropped(flowwarden::datapath::DropReason::Malformed),
        102
    );
}

#[test]
fn tc_ingress_and_monitor_mode_log_what_they_do() {
    if !require_root("tc_ingress_and_monitor_mode_log_what_they_do") {
        return;
    }
    capture(LevelFilter::Info);
    let frame = malformed();
    let mut dp = LoadedDatapath::new("klog-tc");
    assert_eq!(run(&mut dp, TC_INGRESS, &frame, 1), TC_ACT_SHOT);
    let records = drain(&mut dp.datapath);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0].message.starts_with("dropped a malformed packet"),
        "{records:?}"
    );

    let mut dp = LoadedDatapath::new("klog-monitor");
    dp.datapath.maps.set_mode(Mode::Monitor).unwrap();
    assert_eq!(run(&mut dp, XDP_INGRESS, &frame, 1), XDP_PASS);
    let records = drain(&mut dp.datapath);
    assert_eq!(records.len(), 1, "{records:?}");
    assert!(
        records[0]
            .message
            .starts_with("monitor mode: would drop a malformed packet"),
        "{records:?}"
    );
}

#[test]
fn admitted_and_unprotected_packets_log_nothing() {
    if !require_root("admitted_and_unprotected_packets_log_nothing") {
        return;
    }
    // The most verbose level: nothing these paths could log is held back.
    capture(LevelFilter::Trace);
    let mut dp = LoadedDatapath::new("klog-quiet");
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, SESSION).unwrap();
    let request = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_ACK)
        .payload(b"hello")
        .build();
    let reply = Frame::tcp(ip(SERVER), 22, ip(CLIENT), 40000)
        .flags(TCP_ACK)
        .build();
    let unprotected = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 80).build();
    // A new flow through the grant, then the established flow both ways, and other traffic.
    assert_eq!(run(&mut dp, XDP_INGRESS, &request, 1), XDP_PASS);
    assert_eq!(run(&mut dp, XDP_INGRESS, &request, 1000), XDP_PASS);
    assert_eq!(run(&mut dp, TC_INGRESS, &request, 1000), 0);
    assert_eq!(run(&mut dp, TC_EGRESS, &reply, 1000), 0);
    assert_eq!(run(&mut dp, XDP_INGRESS, &unprotected, 1000), XDP_PASS);
    let records = drain(&mut dp.datapath);
    assert!(
        records.is_empty(),
        "admitted traffic was logged: {records:?}"
    );

    // The same load does log a drop (debug: the audit log already has denied flows), so the
    // silence above is not a logger that is not working.
    let stranger = Frame::tcp(ip("192.0.2.99"), 40000, ip(SERVER), 22).build();
    assert_eq!(run(&mut dp, XDP_INGRESS, &stranger, 1), XDP_DROP);
    let records = drain(&mut dp.datapath);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].level, Level::Debug);
    assert_eq!(
        records[0].message,
        format!(
            "no grant admits ::ffff:192.0.2.99:40000 -> ::ffff:10.9.0.2:22 (resource {ssh}); \
             monitor mode 0"
        )
    );
}

#[test]
fn records_above_the_level_at_load_are_not_even_written() {
    if !require_root("records_above_the_level_at_load_are_not_even_written") {
        return;
    }
    capture(LevelFilter::Info);
    let mut dp = LoadedDatapath::new("klog-level");
    // Debug now, after the load: the programs still only write up to info.
    log::set_max_level(LevelFilter::Trace);
    let stranger = Frame::tcp(ip("192.0.2.99"), 40000, ip(SERVER), 22).build();
    assert_eq!(run(&mut dp, XDP_INGRESS, &stranger, 1), XDP_DROP);
    let records = drain(&mut dp.datapath);
    assert!(
        records.is_empty(),
        "a debug record was written at level info: {records:?}"
    );
    // Warnings still are.
    assert_eq!(run(&mut dp, XDP_INGRESS, &malformed(), 1), XDP_DROP);
    assert_eq!(drain(&mut dp.datapath).len(), 1);
}

#[test]
fn the_first_drop_of_a_revoked_session_is_logged_once() {
    if !require_root("the_first_drop_of_a_revoked_session_is_logged_once") {
        return;
    }
    capture(LevelFilter::Info);
    let mut dp = LoadedDatapath::new("klog-revoked");
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, SESSION).unwrap();
    let request = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_ACK)
        .build();
    assert_eq!(run(&mut dp, XDP_INGRESS, &request, 1), XDP_PASS);
    dp.datapath.maps.revoke(SESSION).unwrap();
    assert_eq!(run(&mut dp, XDP_INGRESS, &request, 1), XDP_DROP);
    let records = drain(&mut dp.datapath);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].level, Level::Info);
    assert_eq!(
        records[0].message,
        format!(
            "session 0e551000000000a1 is revoked: dropped its first packet since, \
             ::ffff:192.0.2.10:40000 -> ::ffff:10.9.0.2:22 (resource {ssh})"
        )
    );
    assert_eq!(run(&mut dp, XDP_INGRESS, &request, 50), XDP_DROP);
    let records = drain(&mut dp.datapath);
    assert!(records.is_empty(), "logged more than once: {records:?}");
}

#[test]
fn a_full_flow_table_is_logged_as_a_warning() {
    if !require_root("a_full_flow_table_is_logged_as_a_warning") {
        return;
    }
    capture(LevelFilter::Info);
    const CAPACITY: u32 = 8;
    let mut dp = LoadedDatapath::with_flow_table("klog-full", CAPACITY);
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, SESSION).unwrap();
    for sport in 0..=CAPACITY as u16 {
        let frame = Frame::tcp(ip(CLIENT), 1000 + sport, ip(SERVER), 22).build();
        let expected = if u32::from(sport) < CAPACITY {
            XDP_PASS
        } else {
            XDP_DROP
        };
        assert_eq!(
            run(&mut dp, XDP_INGRESS, &frame, 1),
            expected,
            "port {sport}"
        );
    }
    let records = drain(&mut dp.datapath);
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0].level, Level::Warn);
    assert_eq!(
        records[0].message,
        format!(
            "the flow table is full: denied the new flow ::ffff:192.0.2.10:1008 -> \
             ::ffff:10.9.0.2:22 (resource {ssh}); raise [datapath] flow_table_size"
        )
    );
}

#[test]
fn a_second_load_reads_the_records_of_the_programs_it_adopts() {
    if !require_root("a_second_load_reads_the_records_of_the_programs_it_adopts") {
        return;
    }
    capture(LevelFilter::Info);
    // The first load stands for the programs a stopped agent left attached; the second for
    // the restarted agent, which adopts them instead of running its own.
    let mut first = LoadedDatapath::new("klog-adopt");
    let mut second = Datapath::load(&LoadOptions {
        pin_dir: first.datapath.pin_dir().to_owned(),
        flow_table_size: first.datapath.maps.flow_fill().1,
        ..LoadOptions::default()
    })
    .expect("a second load over the same pins");
    assert_eq!(run(&mut first, XDP_INGRESS, &malformed(), 1), XDP_DROP);
    let records = drain(&mut second);
    assert_eq!(
        records.len(),
        1,
        "the second load did not see the first one's record: {records:?}"
    );
    assert!(records[0].message.starts_with("dropped a malformed packet"));
}
