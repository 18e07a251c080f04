//! Walks over the kernel's hash maps: in chunks (BPF_MAP_LOOKUP_BATCH) where the kernel can,
//! key by key where it cannot; and the flow table's own read handle, which walks without the
//! lock the map writers share.

use std::os::fd::AsFd as _;

use agent_common::{Flow, FlowKey, map_names as names};
use aya::maps::{HashMap, IterableMap as _, Map, MapData};

use super::{DatapathError, batch, maps::map_err};

/// Flows read per BPF_MAP_LOOKUP_BATCH call: 8,192 × 104 bytes of buffers (832 KiB), so a
/// million flows take about 120 syscalls.
pub const FLOW_CHUNK: usize = 8_192;

/// How a walk over a hash map read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walk {
    /// In chunks (BPF_MAP_LOOKUP_BATCH), this many syscalls.
    Batched { syscalls: usize },
    /// Key by key: the kernel has no batch lookup (before Linux 5.6).
    PerKey,
    /// The kernel refused a read part way; the entries before it were handed over.
    Failed,
}

/// Hands every entry of `map` to `each`: in chunks where the kernel can, key by key where it
/// cannot. A read that fails part way is logged and ends the walk (falling back then would
/// hand over entries twice); callers treat the maps as the truth of the moment anyway.
pub(super) fn walk<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> Walk {
    match batch::lookup(map.map().fd(), chunk, &mut each) {
        Ok(batch::Lookup::Done { syscalls }) => Walk::Batched { syscalls },
        Ok(batch::Lookup::Unsupported) => {
            tracing::debug!(map = name, "batch lookup unavailable: reading key by key");
            for (k, v) in map.iter().filter_map(|r| r.ok()) {
                each(&k, &v);
            }
            Walk::PerKey
        }
        Err(e) => {
            tracing::warn!(map = name, error = %e, "reading the map stopped part way");
            Walk::Failed
        }
    }
}

/// A read-only handle on the flow table, on a descriptor of its own: walks through it take
/// no lock of the agent's, so a list or a sweep over a million flows never delays a grant or
/// a revocation being written meanwhile.
pub struct FlowTable {
    map: HashMap<MapData, FlowKey, Flow>,
}

impl FlowTable {
    pub(super) fn new(flows: &HashMap<MapData, FlowKey, Flow>) -> Result<Self, DatapathError> {
        let fd = flows
            .map()
            .fd()
            .as_fd()
            .try_clone_to_owned()
            .map_err(|e| DatapathError::Map {
                name: names::FLOWS,
                action: "duplicate descriptor",
                source: Box::new(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
                    call: "fcntl(F_DUPFD_CLOEXEC)",
                    io_error: e,
                })),
            })?;
        let data = MapData::from_fd(fd).map_err(map_err(names::FLOWS, "reopen"))?;
        let map = Map::HashMap(data)
            .try_into()
            .map_err(map_err(names::FLOWS, "reopen"))?;
        Ok(Self { map })
    }

    /// Hands every flow the kernel holds to `each`, read [`FLOW_CHUNK`] at a time, without
    /// collecting them: a walk over a million flows holds one chunk in memory, not the table.
    pub fn for_each(&self, each: impl FnMut(&FlowKey, &Flow)) {
        self.for_each_in_chunks(FLOW_CHUNK, each);
    }

    /// [`FlowTable::for_each`] with `chunk` entries per syscall, and how the walk went: for
    /// tests and benchmarks that check the batched read against the key-by-key one.
    pub fn for_each_in_chunks(&self, chunk: usize, each: impl FnMut(&FlowKey, &Flow)) -> Walk {
        walk(&self.map, names::FLOWS, chunk, each)
    }
}
