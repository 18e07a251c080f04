//! BPF_MAP_DELETE_BATCH (Linux 5.6): many keys out of a hash map in one syscall. A policy
//! change can withdraw a grant from every live session at once; one syscall per grant was most
//! of its cost at 100,000 sessions.

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

const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

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
