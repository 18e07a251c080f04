//! The batched walk over the kernel's flow table (BPF_MAP_LOOKUP_BATCH) against aya's
//! key-by-key iteration of the same pinned map: the same flows, each exactly once, for an
//! empty table, one flow, exactly one chunk, one more than a chunk and several chunks. And the
//! flow index (each session's flows without a walk) against full walks of the same table.

use std::{collections::HashMap, net::Ipv4Addr};

use agent_common::{IPPROTO_TCP, IPPROTO_UDP, map_names};
use aya::maps::{HashMap as AyaHashMap, Map, MapData};
use flowwarden::{
    datapath::{FLOW_CHUNK, Flow, FlowKey, Maps, Walk, addr_bytes, maps_dir},
    enforce::Enforcer,
    sessions::model::SessionId,
};
use flowwarden_tests::{loaded::LoadedDatapath, privileged::require_root};

/// Room for the largest case with the table at most half full, as a busy agent's would be.
const TABLE: u32 = 65_536;

/// More flows than any bucket of the table holds in these cases (the kernel hashes with a
/// random seed; a half-full table's longest chain is far shorter).
const BUCKET_ROOM: usize = 64;

/// A distinct flow for each `i`, with counters that tell flows apart too.
fn flow(i: u32) -> (FlowKey, Flow) {
    let client = Ipv4Addr::from(0x0a40_0000 + i / 1_000);
    let key = FlowKey {
        src: addr_bytes(client.into()),
        dst: addr_bytes(Ipv4Addr::new(10, 9, 0, 2).into()),
        sport: 20_000 + (i % 1_000) as u16,
        dport: if i.is_multiple_of(3) { 53 } else { 22 },
        proto: if i.is_multiple_of(3) {
            IPPROTO_UDP
        } else {
            IPPROTO_TCP
        },
        _pad: [0; 3],
    };
    let value = Flow {
        session_id: 0x5e55_0000_0000_0000 | u64::from(i / 10),
        resource_id: 1 + i % 3,
        created_ns: u64::from(i) * 1_000,
        last_seen_ns: u64::from(i) * 2_000,
        rx_packets: u64::from(i),
        rx_bytes: u64::from(i) * 100,
        tx_packets: u64::from(i) + 1,
        tx_bytes: u64::from(i) * 200,
        ..Flow::default()
    };
    (key, value)
}

/// The reference: aya's own key-by-key iteration (BPF_MAP_GET_NEXT_KEY and a lookup per
/// flow) over the pinned map, opened separately from the agent's handles.
fn key_by_key(dp: &LoadedDatapath) -> HashMap<FlowKey, Flow> {
    let path = maps_dir(dp.datapath.maps.pin_dir()).join(map_names::FLOWS);
    let data = MapData::from_pin(&path).expect("opening the pinned flow map");
    let map: AyaHashMap<MapData, FlowKey, Flow> = Map::HashMap(data)
        .try_into()
        .expect("the flow map as a hash map");
    map.iter()
        .map(|r| r.expect("reading a flow key by key"))
        .collect()
}

/// Walks the table in chunks of `chunk` and checks the walk against what was inserted and
/// against the key-by-key reference.
fn check(dp: &LoadedDatapath, inserted: &HashMap<FlowKey, Flow>, chunk: usize) {
    let n = inserted.len();
    let mut seen = Vec::new();
    let walk = dp
        .datapath
        .maps
        .for_each_flow_in_chunks(chunk, |k, f| seen.push((*k, *f)));
    let Walk::Batched { syscalls } = walk else {
        panic!(
            "{n} flows, chunk {chunk}: expected a batched walk (BPF_MAP_LOOKUP_BATCH, Linux \
             5.6+), got {walk:?}"
        );
    };
    // A chunk smaller than a bucket grows until the bucket fits (buckets here hold a handful
    // of flows at most), so small chunks are only bounded by that.
    let least = n.div_ceil(chunk.max(BUCKET_ROOM)).max(1);
    assert!(
        syscalls >= least,
        "{n} flows in chunks of {chunk} cannot take only {syscalls} syscalls (at least {least})"
    );
    assert_eq!(
        seen.len(),
        n,
        "chunk {chunk}: the walk handed over {} flows for {n} in the table (repeats or gaps)",
        seen.len()
    );
    let walked: HashMap<FlowKey, Flow> = seen.into_iter().collect();
    assert_eq!(
        walked.len(),
        n,
        "chunk {chunk}: the walk handed over some flows twice"
    );
    assert!(
        walked == *inserted,
        "chunk {chunk}: the batched walk differs from the {n} flows inserted"
    );
    let reference = key_by_key(dp);
    assert_eq!(
        reference.len(),
        n,
        "the key-by-key walk saw {}",
        reference.len()
    );
    assert!(
        walked == reference,
        "chunk {chunk}: the batched walk differs from the key-by-key walk over {n} flows"
    );
}

#[test]
fn batched_flow_walk_matches_the_key_by_key_walk() {
    if !require_root("batched_flow_walk_matches_the_key_by_key_walk") {
        return;
    }
    let mut dp = LoadedDatapath::with_flow_table("fwalk", TABLE);
    let mut inserted = HashMap::new();
    let sizes = [
        0,
        1,
        FLOW_CHUNK,
        FLOW_CHUNK + 1,
        3 * FLOW_CHUNK + FLOW_CHUNK / 2,
    ];
    for size in sizes {
        while inserted.len() < size {
            let (k, f) = flow(inserted.len() as u32);
            dp.datapath
                .maps
                .insert_flow(k, f)
                .unwrap_or_else(|e| panic!("inserting flow {}: {e}", inserted.len()));
            // As written: the agent fills in the session's slot.
            let written = dp.datapath.maps.flow(&k).expect("the flow just written");
            assert_eq!(written.session_id, f.session_id);
            inserted.insert(k, written);
        }
        check(&dp, &inserted, FLOW_CHUNK);
        let all = dp.datapath.maps.flows();
        assert_eq!(all.len(), size, "Maps::flows() over {size} flows");
        assert_eq!(
            dp.datapath.maps.flow_fill(),
            (size, TABLE),
            "flow_fill over {size} flows"
        );
    }
    // Small chunks cross thousands of boundaries; a chunk of one meets buckets that hold
    // several flows, which the kernel refuses to split (ENOSPC) until the chunk grows.
    for chunk in [1, 7, 1_000] {
        check(&dp, &inserted, chunk);
    }
    // Removing flows leaves holes in buckets the walk must step over.
    let gone: Vec<FlowKey> = inserted.keys().copied().step_by(3).collect();
    for k in &gone {
        dp.datapath.maps.remove_flow(k).expect("removing a flow");
        inserted.remove(k);
    }
    check(&dp, &inserted, FLOW_CHUNK);
}

/// Every session's flow keys from one full walk, sorted.
fn by_session(flows: Vec<(FlowKey, Flow)>) -> HashMap<u64, Vec<FlowKey>> {
    let mut out: HashMap<u64, Vec<FlowKey>> = HashMap::new();
    for (k, f) in flows {
        out.entry(f.session_id).or_default().push(k);
    }
    for keys in out.values_mut() {
        keys.sort_by_key(|k| (k.src, k.sport, k.dport));
    }
    out
}

/// Checks every session's flows through the index against one full walk (and a session
/// without flows).
fn index_matches_walk(enforcer: &Enforcer, when: &str) {
    let walked = by_session(enforcer.flows());
    for (id, keys) in &walked {
        let indexed = by_session(enforcer.session_flows(SessionId(*id)));
        assert_eq!(
            indexed.get(id),
            Some(keys),
            "{when}: session {id:x} through the flow index differs from the full walk"
        );
        assert_eq!(
            indexed.len(),
            1,
            "{when}: flows of another session for {id:x}"
        );
    }
    assert!(
        enforcer.session_flows(SessionId(0x0bad)).is_empty(),
        "{when}: flows for a session that has none"
    );
}

#[test]
fn the_flow_index_gives_each_session_what_a_full_walk_gives() {
    if !require_root("the_flow_index_gives_each_session_what_a_full_walk_gives") {
        return;
    }
    let mut dp = LoadedDatapath::with_flow_table("fwidx", TABLE);
    // Flows written before this "agent" existed, as an earlier agent's would be: it saw none
    // of their flow-opened events.
    let n = FLOW_CHUNK + FLOW_CHUNK / 2;
    for i in 0..n as u32 {
        let (k, f) = flow(i);
        dp.datapath
            .maps
            .insert_flow(k, f)
            .expect("inserting a flow");
    }
    let enforcer = Enforcer::new(Maps::open_pinned(dp.pin_dir()).expect("the pinned maps"));
    assert_eq!(enforcer.indexed_flows(), 0);
    // Before the first walk the index cannot tell, and a lookup walks instead.
    let some = flow(7).1.session_id;
    assert_eq!(
        by_session(enforcer.session_flows(SessionId(some))).get(&some),
        by_session(enforcer.flows()).get(&some),
        "before the first walk"
    );

    let census = enforcer.census();
    assert_eq!(census.flows, n);
    assert_eq!(
        enforcer.indexed_flows(),
        n,
        "the walk at start taught the index every flow"
    );
    index_matches_walk(&enforcer, "after the first walk");

    // Removed by the agent: gone from the index at once.
    let first = flow(0).1.session_id;
    let removed = enforcer.remove_flows(|_, f| f.session_id == first || f.resource_id == 2);
    assert!(removed.len() > n / 4, "removed {} flows", removed.len());
    assert_eq!(enforcer.indexed_flows(), n - removed.len());
    assert!(enforcer.session_flows(SessionId(first)).is_empty());
    index_matches_walk(&enforcer, "after the agent removed flows");

    // Removed behind the agent's back: lookups check the kernel, and the next walk prunes.
    let (gone_key, gone) = flow(15);
    dp.datapath
        .maps
        .remove_flow(&gone_key)
        .expect("removing a flow");
    index_matches_walk(&enforcer, "after a flow went behind the agent's back");
    enforcer.census();
    assert_eq!(enforcer.indexed_flows(), n - removed.len() - 1);

    // Opened now, with its event: listed without another walk.
    let (new_key, mut new) = flow(n as u32 + 5);
    new.session_id = gone.session_id;
    dp.datapath
        .maps
        .insert_flow(new_key, new)
        .expect("inserting a flow");
    // As written: the agent fills in the session's slot.
    let new = dp
        .datapath
        .maps
        .flow(&new_key)
        .expect("the flow just written");
    enforcer.flow_opened(SessionId(new.session_id), &new_key);
    assert!(
        enforcer
            .session_flows(SessionId(new.session_id))
            .contains(&(new_key, new)),
        "a flow known from its event"
    );
    index_matches_walk(&enforcer, "after a flow-opened event");
}
