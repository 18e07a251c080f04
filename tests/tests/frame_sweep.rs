//! Hostile-input sweep: well over 100,000 random and mutated frames (truncated headers at every
//! length, bad IHL and lengths, IPv6 extension-header chains past the parser's limit,
//! fragments, one to three VLAN tags, bad TCP data offsets, noise) through the three real
//! programs with BPF_PROG_TEST_RUN. Each verdict and each counter change is checked against
//! an independent model of the intended policy (`flowwarden_tests::hostile_frames`).
//!
//! `FW_SWEEP_SEED` and `FW_SWEEP_FRAMES` override the fixed seed and the number of random
//! frames; the seed is printed (run with `--nocapture`) and named in every failure.

use std::collections::{HashMap, HashSet};

use agent_common::program_names::{TC_EGRESS, TC_INGRESS, XDP_INGRESS};
use flowwarden::datapath::{Counters, DropReason, Flow, FlowKey, addr_from_bytes};
use flowwarden_tests::{
    hostile_frames::{
        Addr, Class, GRANTED4, GRANTED6, REVOKED_SPORTS, REVOKED4, Rng, SERVER4, Sample, TCP,
        Tuple, UDP, classify, v4,
    },
    loaded::LoadedDatapath,
    privileged::require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const DEFAULT_SEED: u64 = 0xf10f_5eed_2024_0006;
const DEFAULT_RANDOM_FRAMES: usize = 100_000;
/// Well-formed frames cut at every length from 14 bytes up.
const TRUNCATED_BASES: usize = 200;

const LIVE_SESSION: u64 = 0x5eed_0000_0000_0001;
const REVOKED_SESSION: u64 = 0x5eed_0000_0000_0002;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Pass,
    Drop,
}

/// The counter changes one run must make.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Delta {
    malformed: u64,
    no_grant: u64,
    revoked: u64,
    flow_table_full: u64,
    flows_opened: u64,
    rst_passed: u64,
}

impl Delta {
    fn between(before: &Counters, after: &Counters) -> Delta {
        let d = |r| after.dropped(r) - before.dropped(r);
        let monitored: u64 = DropReason::ALL
            .iter()
            .map(|&r| after.would_drop(r) - before.would_drop(r))
            .sum();
        assert_eq!(monitored, 0, "enforce mode counted a monitor-mode drop");
        Delta {
            malformed: d(DropReason::Malformed),
            no_grant: d(DropReason::NoGrant),
            revoked: d(DropReason::Revoked),
            flow_table_full: d(DropReason::FlowTableFull),
            flows_opened: after.flows_opened - before.flows_opened,
            rst_passed: after.rst_passed_after_revoke - before.rst_passed_after_revoke,
        }
    }
}

/// What the kernel maps hold, as the test set them up and as the programs must change them.
struct World {
    resources: [(u8, u16, u32); 3],
    admin_id: u32,
    grants: HashMap<(Addr, u32), u64>,
    revoked: HashSet<u64>,
    flows: HashMap<FlowKey, u64>,
}

fn key(t: &Tuple) -> FlowKey {
    FlowKey {
        src: t.src,
        dst: t.dst,
        sport: t.sport,
        dport: t.dport,
        proto: t.proto,
        _pad: [0; 3],
    }
}

impl World {
    /// Which resource owns `proto`/`port` at `dst`, from the test policy: ssh tcp/22 and dns
    /// udp/53 everywhere, admin tcp/8443 only towards 10.9.0.0/16 and fd09::/16 (IPv4 in its
    /// mapped form, as the kernel keys it).
    fn resource_of(&self, proto: u8, port: u16, dst: &Addr) -> u32 {
        let Some(&(_, _, id)) = self
            .resources
            .iter()
            .find(|&&(p, n, _)| p == proto && n == port)
        else {
            return 0;
        };
        if id != self.admin_id {
            return id;
        }
        let in_v4 = dst[..12] == v4([0; 4])[..12] && dst[12..14] == [10, 9];
        let in_v6 = dst[..2] == [0xfd, 0x09];
        if in_v4 || in_v6 { id } else { 0 }
    }

    fn ingress(&mut self, class: &Class) -> (Verdict, Delta) {
        let drop = |d: Delta| (Verdict::Drop, d);
        let t = match class {
            Class::Ignore => return (Verdict::Pass, Delta::default()),
            Class::Malformed => {
                return drop(Delta {
                    malformed: 1,
                    ..Delta::default()
                });
            }
            Class::Packet(t) => t,
        };
        let resource = self.resource_of(t.proto, t.dport, &t.dst);
        if resource == 0 {
            return (Verdict::Pass, Delta::default());
        }
        let k = key(t);
        let revoked = Delta {
            revoked: 1,
            ..Delta::default()
        };
        if let Some(session) = self.flows.get(&k) {
            let syn_only = t.proto == TCP && t.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            if !self.revoked.contains(session) {
                return (Verdict::Pass, Delta::default());
            }
            if !syn_only {
                return drop(revoked);
            }
            // A fresh SYN on a revoked flow's 5-tuple may open through a live grant.
        }
        match self.grants.get(&(t.src, resource)) {
            None => drop(Delta {
                no_grant: 1,
                ..Delta::default()
            }),
            Some(s) if self.revoked.contains(s) => drop(revoked),
            Some(&s) => {
                self.flows.insert(k, s);
                (
                    Verdict::Pass,
                    Delta {
                        flows_opened: 1,
                        ..Delta::default()
                    },
                )
            }
        }
    }

    fn egress(&self, class: &Class) -> (Verdict, Delta) {
        let Class::Packet(t) = class else {
            return (Verdict::Pass, Delta::default());
        };
        if self.resource_of(t.proto, t.sport, &t.src) == 0 {
            return (Verdict::Pass, Delta::default());
        }
        let reversed = FlowKey {
            src: t.dst,
            dst: t.src,
            sport: t.dport,
            dport: t.sport,
            proto: t.proto,
            _pad: [0; 3],
        };
        match self.flows.get(&reversed) {
            Some(s) if self.revoked.contains(s) => {
                if t.proto == TCP && t.tcp_flags & TCP_RST != 0 {
                    let d = Delta {
                        rst_passed: 1,
                        ..Delta::default()
                    };
                    (Verdict::Pass, d)
                } else {
                    let d = Delta {
                        revoked: 1,
                        ..Delta::default()
                    };
                    (Verdict::Drop, d)
                }
            }
            _ => (Verdict::Pass, Delta::default()),
        }
    }

    /// Whether a packet with this tuple may reach its resource: through a live grant, or a
    /// flow of a live session.
    fn admitted(&self, t: &Tuple) -> bool {
        let resource = self.resource_of(t.proto, t.dport, &t.dst);
        let live = |s: &u64| !self.revoked.contains(s);
        resource == 0
            || self.flows.get(&key(t)).is_some_and(live)
            || self.grants.get(&(t.src, resource)).is_some_and(live)
    }
}

/// Tallies for the summary line.
#[derive(Default, Debug)]
struct Tally {
    frames: usize,
    runs: usize,
    ignored: usize,
    malformed: usize,
    denied: usize,
    admitted: usize,
    untouched: usize,
    deliverable_denied: usize,
    egress_dropped: usize,
    /// TC runs the kernel's test harness refused (see [`skb_harness_refuses`]).
    skb_refused: usize,
}

struct Sweep {
    dp: LoadedDatapath,
    world: World,
    seed: u64,
    counters: Counters,
    tally: Tally,
}

impl Sweep {
    fn run(&mut self, n: usize, sample: &Sample) {
        self.tally.frames += 1;
        let class = classify(&sample.frame);
        // The safety property, on its own: whatever the frame, if the generator knows that
        // the stack would deliver it to a resource that no grant opens, it must be dropped.
        let must_drop = sample
            .delivers_to
            .as_ref()
            .is_some_and(|t| !self.world.admitted(t));
        let protected_unadmitted = matches!(&class, Class::Packet(t) if !self.world.admitted(t));
        match &class {
            Class::Ignore => self.tally.ignored += 1,
            Class::Malformed => self.tally.malformed += 1,
            Class::Packet(_) if protected_unadmitted => self.tally.denied += 1,
            Class::Packet(t) if self.world.resource_of(t.proto, t.dport, &t.dst) != 0 => {
                self.tally.admitted += 1;
            }
            Class::Packet(_) => self.tally.untouched += 1,
        }
        if must_drop {
            self.tally.deliverable_denied += 1;
            assert_ne!(
                class,
                Class::Ignore,
                "seed {:#x} frame {n}: the model ignores a frame the stack would deliver to a \
                 resource without a grant: {}",
                self.seed,
                sample.recipe
            );
        }
        for program in [XDP_INGRESS, TC_INGRESS] {
            let Some(got) = self.execute(n, program, &sample.frame, sample) else {
                continue;
            };
            let expected = self.world.ingress(&class);
            if must_drop || protected_unadmitted {
                assert_eq!(
                    got.0,
                    Verdict::Drop,
                    "SECURITY: seed {:#x} frame {n}: {program} passed a packet to a resource \
                     without a grant ({class:?}, {}): {}\nframe: {}",
                    self.seed,
                    describe_tuple(&class),
                    sample.recipe,
                    hex(&sample.frame)
                );
            }
            self.expect(n, program, sample, &sample.frame, expected, got);
        }
        let mirror_class = classify(&sample.mirror);
        if let Some(got) = self.execute(n, TC_EGRESS, &sample.mirror, sample) {
            let expected = self.world.egress(&mirror_class);
            if got.0 == Verdict::Drop {
                self.tally.egress_dropped += 1;
            }
            self.expect(n, TC_EGRESS, sample, &sample.mirror, expected, got);
        }
    }

    fn execute(
        &mut self,
        n: usize,
        program: &'static str,
        frame: &[u8],
        sample: &Sample,
    ) -> Option<(Verdict, Delta)> {
        let out = match self.dp.datapath.test_run(program, frame, 1) {
            Ok(out) => out,
            Err(_) if program != XDP_INGRESS && skb_harness_refuses(frame) => {
                self.tally.skb_refused += 1;
                return None;
            }
            Err(e) => panic!(
                "seed {:#x} frame {n}: {program} test run failed: {e:?}: {}\nframe: {}",
                self.seed,
                sample.recipe,
                hex(frame)
            ),
        };
        self.tally.runs += 1;
        let verdict = match (program, out.return_value) {
            (XDP_INGRESS, XDP_PASS) | (TC_INGRESS | TC_EGRESS, TC_ACT_OK) => Verdict::Pass,
            (XDP_INGRESS, XDP_DROP) | (TC_INGRESS | TC_EGRESS, TC_ACT_SHOT) => Verdict::Drop,
            (_, other) => panic!(
                "seed {:#x} frame {n}: {program} returned {other}, not a verdict it may give \
                 (an abort or an error): {}\nframe: {}",
                self.seed,
                sample.recipe,
                hex(frame)
            ),
        };
        let after = self.dp.counters();
        let delta = Delta::between(&self.counters, &after);
        self.counters = after;
        Some((verdict, delta))
    }

    fn expect(
        &self,
        n: usize,
        program: &str,
        sample: &Sample,
        frame: &[u8],
        expected: (Verdict, Delta),
        got: (Verdict, Delta),
    ) {
        assert_eq!(
            expected,
            got,
            "seed {:#x} frame {n}: {program} on {:?}: expected (verdict, counter changes) on \
             the left, the kernel's on the right: {}\nframe: {}",
            self.seed,
            classify(frame),
            sample.recipe,
            hex(frame)
        );
    }
}

fn describe_tuple(class: &Class) -> String {
    match class {
        Class::Packet(t) => format!(
            "{} → {}:{}",
            addr_from_bytes(t.src),
            addr_from_bytes(t.dst),
            t.dport
        ),
        _ => "-".into(),
    }
}

/// BPF_PROG_TEST_RUN builds an skb only around a whole network header: an untagged IPv4
/// frame with less than 20 bytes after Ethernet, or IPv6 with less than 40, is refused
/// (EINVAL) before any TC program runs. XDP takes them, and they are swept there.
fn skb_harness_refuses(frame: &[u8]) -> bool {
    let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let l3 = frame.len() - 14;
    (ethertype == 0x0800 && l3 < 20) || (ethertype == 0x86dd && l3 < 40)
}

fn hex(frame: &[u8]) -> String {
    frame.iter().map(|b| format!("{b:02x}")).collect()
}

fn env_u64(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    let v = v.trim();
    let parsed = match v.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    parsed.unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
}

#[test]
fn hostile_frames_never_open_a_resource_and_never_abort() {
    if !require_root("hostile_frames_never_open_a_resource_and_never_abort") {
        return;
    }
    let seed = env_u64("FW_SWEEP_SEED", DEFAULT_SEED);
    let random_frames = env_u64("FW_SWEEP_FRAMES", DEFAULT_RANDOM_FRAMES as u64) as usize;
    println!("frame sweep: seed {seed:#x} (FW_SWEEP_SEED), {random_frames} random frames");

    let mut dp = LoadedDatapath::new("sweep");
    let ssh = dp.resource_id("ssh");
    let dns = dp.resource_id("dns");
    let admin = dp.resource_id("admin");
    let mut grants = HashMap::new();
    for source in [v4(GRANTED4), GRANTED6] {
        for resource in [ssh, dns, admin] {
            grants.insert((source, resource), LIVE_SESSION);
        }
    }
    grants.insert((v4(REVOKED4), ssh), REVOKED_SESSION);
    for (&(source, resource), &session) in &grants {
        dp.datapath
            .maps
            .grant(addr_from_bytes(source), resource, session)
            .expect("grant");
    }
    // The revoked session's flows linger, as they do between a revocation and the sweep.
    let mut flows = HashMap::new();
    for sport in REVOKED_SPORTS {
        let k = FlowKey {
            src: v4(REVOKED4),
            dst: v4(SERVER4),
            sport,
            dport: 22,
            proto: TCP,
            _pad: [0; 3],
        };
        let flow = Flow {
            session_id: REVOKED_SESSION,
            resource_id: ssh,
            ..Flow::default()
        };
        dp.datapath.maps.insert_flow(k, flow).expect("insert flow");
        flows.insert(k, REVOKED_SESSION);
    }
    dp.datapath.maps.revoke(REVOKED_SESSION).expect("revoke");

    let counters = dp.counters();
    let mut sweep = Sweep {
        dp,
        world: World {
            resources: [(TCP, 22, ssh), (UDP, 53, dns), (TCP, 8443, admin)],
            admin_id: admin,
            grants,
            revoked: HashSet::from([REVOKED_SESSION]),
            flows,
        },
        seed,
        counters,
        tally: Tally::default(),
    };
    let mut rng = Rng::new(seed);
    let mut n = 0;
    for _ in 0..TRUNCATED_BASES {
        for sample in Sample::truncations(&mut rng) {
            sweep.run(n, &sample);
            n += 1;
        }
    }
    for _ in 0..random_frames {
        let sample = Sample::random(&mut rng);
        sweep.run(n, &sample);
        n += 1;
    }

    let t = &sweep.tally;
    println!("frame sweep: seed {seed:#x}: {t:?}");
    // The sweep must have reached every branch it claims to test.
    assert!(
        t.frames >= 100_000 || random_frames < DEFAULT_RANDOM_FRAMES,
        "{t:?}"
    );
    for (what, count) in [
        ("ignored", t.ignored),
        ("malformed", t.malformed),
        ("denied", t.denied),
        ("admitted", t.admitted),
        ("untouched", t.untouched),
        ("deliverable and denied", t.deliverable_denied),
        ("dropped on egress", t.egress_dropped),
    ] {
        assert!(count > 0, "no {what} frame in the sweep: {t:?}");
    }
    let kernel_flows = sweep.dp.datapath.maps.flows().len();
    assert_eq!(
        kernel_flows,
        sweep.world.flows.len(),
        "the kernel holds another set of flows than the model"
    );
}
