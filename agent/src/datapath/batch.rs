//! Batched hash-map syscalls (Linux 5.6): BPF_MAP_DELETE_BATCH takes many keys out in one call,
//! BPF_MAP_LOOKUP_BATCH reads thousands of entries per call. A policy change can withdraw a
//! grant from every live session at once, and `sessions list` walks a flow table of a million
//! entries; one syscall per entry (two per entry for a walk) was most of their cost.

use std::{
    io,
    os::fd::{AsFd, AsRawFd},
};

use aya::Pod;

/// The `batch` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// The kernel's internal "operation not supported", which leaks to user space from map types
/// without a batch operation.
const ENOTSUPP: i32 = 524;

/// How a [`lookup`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Every entry was handed over, in this many syscalls.
    Done { syscalls: usize },
    /// The kernel has no batch lookup for this map (before 5.6, or another map type); nothing
    /// was handed over, so the caller can walk the map key by key instead.
    Unsupported,
}

/// Hands every (key, value) of the hash map (or array) behind `map` to `each`, reading up to `chunk`
/// entries per syscall into two buffers reused from call to call, so a walk over a million
/// entries takes a few hundred syscalls and never holds more than one chunk in memory.
///
/// The kernel returns whole hash buckets, each read under its bucket lock: an entry present
/// for the whole walk is seen exactly once (a key-by-key walk may restart from the first
/// bucket when the key it stands on is deleted, and so repeat entries). Entries inserted or
/// deleted during the walk may or may not be seen.
///
/// `K` and `V` must be the map's key and value types (for example those of an aya
/// `HashMap<_, K, V>`, which checks their sizes): the kernel writes entries at those strides.
///
/// # Errors
/// The kernel refuses a read part way through (`each` may have seen some entries).
pub fn lookup<K: Pod, V: Pod>(
    map: impl AsFd,
    chunk: usize,
    mut each: impl FnMut(&K, &V),
) -> io::Result<Lookup> {
    let fd = map.as_fd().as_raw_fd();
    let mut chunk = chunk.clamp(1, u32::MAX as usize);
    let mut keys: Vec<K> = Vec::with_capacity(chunk);
    let mut values: Vec<V> = Vec::with_capacity(chunk);
    // For hash maps the batch token is a u32 bucket index, for arrays the u32 index of the
    // next slot (the generic batch code uses the key as its token). The first call passes no token
    // (start at bucket 0); each call writes where the next one starts.
    let mut token: u32 = 0;
    let token_ptr = &raw mut token;
    let mut started = false;
    let mut syscalls = 0;
    loop {
        keys.clear();
        values.clear();
        let mut attr = BatchAttr {
            in_batch: if started { token_ptr as u64 } else { 0 },
            out_batch: token_ptr as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch`: `keys` and `values` point at room for
        // `count` keys and values of the map's sizes (K and V are the map's Pod types), and
        // `in_batch`/`out_batch` at a u32 token; all stay alive for the call. The kernel reads
        // the token before it writes it, and writes `attr.count` and at most that many entries.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        syscalls += 1;
        let err = (rc != 0).then(io::Error::last_os_error);
        let errno = err.as_ref().and_then(io::Error::raw_os_error);
        let n = (attr.count as usize).min(chunk);
        if err.is_none() || errno == Some(libc::ENOENT) {
            // SAFETY: the kernel wrote `n` ≤ capacity entries at the start of both buffers,
            // and any bytes are valid values of Pod types.
            unsafe {
                keys.set_len(n);
                values.set_len(n);
            }
            for (k, v) in keys.iter().zip(&values) {
                each(k, v);
            }
        }
        match (err, errno) {
            (None, _) => started = true,
            // The walk passed the last bucket: these were the last entries.
            (Some(_), Some(libc::ENOENT)) => return Ok(Lookup::Done { syscalls }),
            // The next bucket holds more entries than a whole chunk: read it with room to spare.
            (Some(_), Some(libc::ENOSPC)) if n == 0 && chunk < u32::MAX as usize / 2 => {
                chunk *= 2;
                keys.reserve(chunk);
                values.reserve(chunk);
            }
            (Some(_), Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)) if !started => {
                return Ok(Lookup::Unsupported);
            }
            (Some(e), _) => return Err(e),
        }
    }
}

/// Deletes `keys` from the hash map behind `map`. A key that is absent is skipped, not an
/// error. Returns how many were deleted.
///
/// # Errors
/// The kernel refuses the batch for another reason (`EINVAL` on kernels before 5.6; the
/// caller may fall back to single deletes).
pub fn delete<K: Pod>(map: impl AsFd, keys: &[K]) -> io::Result<usize> {
    let fd = map.as_fd().as_raw_fd();
    let mut deleted = 0;
    let mut rest = keys;
    while !rest.is_empty() {
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: u32::try_from(rest.len()).unwrap_or(u32::MAX),
            map_fd: fd as u32,
            ..BatchAttr::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr.batch` whose `keys` points at `count` keys of
        // the map's key size (K is the map's Pod key type), alive for the call; the kernel
        // only reads them and writes `attr.count`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_DELETE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as libc::c_uint,
            )
        };
        let done = (attr.count as usize).min(rest.len());
        deleted += done;
        if rc == 0 {
            rest = &rest[done..];
            continue;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOENT) && done < rest.len() {
            // The batch stops at the first absent key: skip it and go on.
            rest = &rest[done + 1..];
            continue;
        }
        return Err(err);
    }
    Ok(deleted)
}

/// Keys per thread below which one thread deletes them all.
const PER_THREAD: usize = 8192;

/// [`delete`], shared out over the cores for large batches: the kernel locks a hash map per
/// bucket, so deletes from several threads proceed side by side.
///
/// # Errors
/// As [`delete`], from any of the threads.
pub fn delete_parallel<K: Pod + Sync>(map: impl AsFd, keys: &[K]) -> io::Result<usize> {
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get().min(8))
        .min(keys.len().div_ceil(PER_THREAD))
        .max(1);
    if threads == 1 {
        return delete(map, keys);
    }
    let fd = map.as_fd();
    let per_thread = keys.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let running: Vec<_> = keys
            .chunks(per_thread)
            .map(|part| scope.spawn(move || delete(fd, part)))
            .collect();
        running.into_iter().try_fold(0, |sum, t| {
            let n = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            Ok(sum + n)
        })
    })
}
