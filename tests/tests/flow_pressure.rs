//! A full flow table under a running agent: new flows to a resource are denied and counted,
//! existing ones go on, revocations stay (the revoked set is a plain hash, never LRU), the fill
//! ratio shows in `status` and in the metrics, and the log says "full" once per episode, not
//! once per denied packet.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use agent_common::map_names;
use aya::maps::{MapInfo, MapType};
use flowwarden::{
    datapath::{DropReason, Flow, FlowKey, Maps, addr_bytes, detach_all, monotonic_ns},
    policy::parse_resources,
};
use flowwarden_tests::{
    agent_proc::{AgentProcess, AgentSetup, Scratch, run_cli, write_config},
    loaded::private_pin_dir,
    netns::NetnsPair,
    privileged::require_root,
    tcp::{accept, carries, connect, listen},
};

const POLICY: &str = "[[resource]]\nname = \"echo\"\nprotocol = \"tcp\"\nports = [7000]\n";
const PORT: u16 = 7000;
/// The smallest table the config allows.
const CAPACITY: u32 = 1024;
const SESSION: u64 = 0xf111_0000_0000_0001;
const REVOKED: u64 = 0xf111_0000_0000_0002;
const SHORT: Duration = Duration::from_millis(400);
const LONG: Duration = Duration::from_secs(5);
const FULL_LOG: &str = "flow table full";
const ROOM_LOG: &str = "flow table has room again";

/// Removes the agent's pins (links and maps) when the test ends, however it ends: the agent
/// leaves them on purpose, so that enforcement outlives it.
struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = detach_all(&self.0);
    }
}

fn wait_for(what: &str, agent: &AgentProcess, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            Instant::now() < until,
            "{what}\nagent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn map_type(pin_dir: &Path, name: &str) -> MapType {
    let path = pin_dir.join("maps").join(name);
    MapInfo::from_pin(&path)
        .and_then(|info| info.map_type())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn a_full_flow_table_is_visible_logged_once_and_evicts_nothing() {
    if !require_root("a_full_flow_table_is_visible_logged_once_and_evicts_nothing") {
        return;
    }
    let pair = NetnsPair::new("press").expect("namespace pair");
    let pin_dir = private_pin_dir("press");
    // Declared before the agent, so dropped after it is killed.
    let _unpin = Unpin(pin_dir.clone());
    let scratch = Scratch::new("press");
    // datapath_extra ends the [datapath] table with more tables of our own.
    let extra = format!(
        "flow_table_size = {CAPACITY}\n\n[sessions]\nsweep_interval_ms = 100\n\n\
         [metrics]\nenabled = true\nlisten = \"127.0.0.1:9469\"\n"
    );
    let config = write_config(
        &scratch,
        &AgentSetup {
            interface: &pair.server_if,
            pin_dir: &pin_dir,
            policy: POLICY,
            datapath_extra: &extra,
        },
    );
    let agent = AgentProcess::start(&pair.server, &config);
    let mut maps = Maps::open_pinned(&pin_dir).expect("opening the agent's pinned maps");
    let echo = parse_resources([(Path::new("p"), POLICY)]).unwrap();
    let echo_id = echo.by_name("echo").unwrap().id;

    // Pressure can never evict a revocation or a flow: revocations live in the preallocated
    // session table (an array: a full one refuses admissions), flows in a plain hash, which
    // refuses an insert when full, never an LRU hash, which would make room by evicting.
    assert_eq!(map_type(&pin_dir, map_names::SESSIONS), MapType::Array);
    assert_eq!(map_type(&pin_dir, map_names::FLOWS), MapType::Hash);
    maps.revoke(REVOKED).unwrap();

    let server: SocketAddr = (pair.server_addr, PORT).into();
    let listener = listen(&pair.server, server);
    maps.grant(pair.client_addr.into(), echo_id, SESSION)
        .unwrap();
    let mut client = connect(&pair.client, server, LONG).expect("granted connection");
    let mut served = accept(&listener, LONG).unwrap();
    assert!(carries(&mut client, &mut served, b"before"));

    // Fill the rest of the table with flows of the same session from elsewhere. The sweep
    // leaves them: they are fresh, and flows of sessions it does not know are not its own.
    let now = monotonic_ns();
    for i in 1..CAPACITY {
        let key = FlowKey {
            src: addr_bytes([198, 51, 100, (i % 250) as u8].into()),
            dst: addr_bytes(pair.server_addr.into()),
            sport: 10_000 + i as u16,
            dport: PORT,
            proto: 6,
            _pad: [0; 3],
        };
        let flow = Flow {
            session_id: SESSION,
            resource_id: echo_id,
            created_ns: now,
            last_seen_ns: now,
            ..Flow::default()
        };
        maps.insert_flow(key, flow).expect("filling the flow table");
    }
    assert_eq!(maps.flow_fill(), (CAPACITY as usize, CAPACITY));

    // New connections are denied, each SYN counted; the open one goes on.
    let before = maps.counters().unwrap().dropped(DropReason::FlowTableFull);
    for _ in 0..3 {
        assert!(
            connect(&pair.client, server, SHORT).is_err(),
            "a new flow got through a full table"
        );
    }
    let denied = maps.counters().unwrap().dropped(DropReason::FlowTableFull) - before;
    assert!(denied >= 3, "each denied SYN is counted: {denied}");
    assert!(
        carries(&mut client, &mut served, b"during"),
        "the existing flow stopped"
    );
    wait_for("the agent should report the full table", &agent, || {
        agent.log_contains(FULL_LOG)
    });
    // More denied packets, across several looks at the counter: still one line.
    for _ in 0..3 {
        assert!(connect(&pair.client, server, SHORT).is_err());
    }
    let denied = maps.counters().unwrap().dropped(DropReason::FlowTableFull) - before;
    assert!(denied >= 6, "{denied}");
    assert_eq!(agent.count_in_log(FULL_LOG), 1, "{}", agent.log());
    assert!(
        maps.revocation(REVOKED).is_some(),
        "a revocation was evicted"
    );

    // The fill ratio, in status and in the metrics.
    let socket = scratch.dir.join("agent.sock");
    let (ok, out) = run_cli(
        None,
        &["--socket", socket.to_str().unwrap(), "status", "--json"],
    );
    assert!(ok, "{out}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["flows"]["count"], CAPACITY, "{status}");
    assert_eq!(status["flows"]["capacity"], CAPACITY, "{status}");
    assert_eq!(status["flows"]["fill_ratio"], 1.0, "{status}");
    assert!(
        status["drops"]["flow_table_full"].as_u64().unwrap() >= denied,
        "{status}"
    );
    let metrics = pair
        .server
        .run(|| -> std::io::Result<String> {
            let mut s = TcpStream::connect("127.0.0.1:9469")?;
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        })
        .expect("scraping the metrics");
    assert!(
        metrics.contains("flowwarden_map_fill_ratio{map=\"flows\"} 1\n"),
        "{metrics}"
    );

    // Room again: a flow ends, a new connection opens, and the log says so once.
    let (some, _) = maps
        .flows()
        .into_iter()
        .find(|(k, _)| k.sport != client.local_addr().unwrap().port())
        .unwrap();
    maps.remove_flow(&some).unwrap();
    let mut second = connect(&pair.client, server, LONG).expect("a connection once there is room");
    let mut second_served = accept(&listener, LONG).unwrap();
    assert!(carries(&mut second, &mut second_served, b"room"));
    wait_for("the agent should report the relief", &agent, || {
        agent.log_contains(ROOM_LOG)
    });
    assert_eq!(agent.count_in_log(FULL_LOG), 1, "{}", agent.log());
    assert_eq!(agent.count_in_log(ROOM_LOG), 1, "{}", agent.log());
}
