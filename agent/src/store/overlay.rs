//! A read-only view of a file for redb: writes land in memory, so that a file can be opened,
//! repaired and checked as a dry run without changing a byte of it.

use std::{
    collections::{HashMap, hash_map::Entry},
    fs::File,
    io,
    os::unix::fs::FileExt,
    sync::{Mutex, PoisonError},
};

use redb::StorageBackend;

/// Granularity of the in-memory copy; redb writes whole 4 KiB pages almost always.
const BLOCK: u64 = 4096;

#[derive(Debug)]
pub(super) struct DryRunFile {
    file: File,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The length redb sees.
    len: u64,
    /// How much of the file is still visible under the copy: a shrink hides the tail for good,
    /// so that growing again shows zeros, as it would on disk.
    file_len: u64,
    /// Blocks written so far, by block number; each is `BLOCK` bytes.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl DryRunFile {
    pub(super) fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            state: Mutex::new(State {
                len,
                file_len: len,
                blocks: HashMap::new(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl State {
    fn block_mut(&mut self, file: &File, block: u64) -> io::Result<&mut [u8]> {
        let file_len = self.file_len;
        match self.blocks.entry(block) {
            Entry::Occupied(entry) => Ok(entry.into_mut()),
            Entry::Vacant(entry) => {
                let mut data = vec![0; BLOCK as usize].into_boxed_slice();
                read_file(file, file_len, block * BLOCK, &mut data)?;
                Ok(entry.insert(data))
            }
        }
    }
}

/// Fills `dst` with what the file holds at `offset`, zeros past `file_len`.
fn read_file(file: &File, file_len: u64, offset: u64, dst: &mut [u8]) -> io::Result<()> {
    let visible = file_len.saturating_sub(offset).min(dst.len() as u64) as usize;
    let (from_file, zeros) = dst.split_at_mut(visible);
    file.read_exact_at(from_file, offset)?;
    zeros.fill(0);
    Ok(())
}

impl StorageBackend for DryRunFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state().len)
    }

    fn read(&self, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let state = self.state();
        let end = offset
            .checked_add(len as u64)
            .filter(|&end| end <= state.len)
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        let mut out = vec![0; len];
        let mut pos = offset;
        while pos < end {
            let (block, within) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - within).min(end - pos);
            let dst = &mut out[(pos - offset) as usize..][..n as usize];
            match state.blocks.get(&block) {
                Some(data) => dst.copy_from_slice(&data[within as usize..][..n as usize]),
                None => read_file(&self.file, state.file_len, pos, dst)?,
            }
            pos += n;
        }
        Ok(out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut state = self.state();
        if len < state.len {
            state.blocks.retain(|&block, _| block * BLOCK < len);
            if let Some(tail) = state.blocks.get_mut(&(len / BLOCK)) {
                tail[(len % BLOCK) as usize..].fill(0);
            }
            state.file_len = state.file_len.min(len);
        }
        state.len = len;
        Ok(())
    }

    fn sync_data(&self, _eventual: bool) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut state = self.state();
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(io::ErrorKind::InvalidInput)?;
        let mut pos = offset;
        while pos < end {
            let (block, within) = (pos / BLOCK, pos % BLOCK);
            let n = (BLOCK - within).min(end - pos);
            let src = &data[(pos - offset) as usize..][..n as usize];
            state.block_mut(&self.file, block)?[within as usize..][..n as usize]
                .copy_from_slice(src);
            pos += n;
        }
        state.len = state.len.max(end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn writes_stay_in_memory_and_reads_see_them() {
        let path = std::env::temp_dir().join(format!("fw-overlay-{}", std::process::id()));
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        File::create(&path)
            .and_then(|mut f| f.write_all(&original))
            .expect("write the test file");
        let dry = DryRunFile::new(File::open(&path).expect("open the test file")).expect("wrap");

        dry.write(4090, &[1; 20])
            .expect("write across a block edge");
        let seen = dry.read(4080, 40).expect("read");
        assert_eq!(&seen[..10], &original[4080..4090]);
        assert_eq!(&seen[10..30], &[1; 20]);
        assert_eq!(&seen[30..], &original[4110..4120]);

        dry.set_len(5000).expect("shrink");
        dry.set_len(9000).expect("grow");
        assert_eq!(
            dry.read(4990, 20).expect("read")[..10],
            original[4990..5000]
        );
        assert_eq!(dry.read(5000, 4000).expect("read"), vec![0; 4000]);
        assert!(dry.read(8990, 20).is_err(), "reads past the end fail");
        dry.write(12_000, &[2; 4]).expect("write past the end");
        assert_eq!(dry.len().expect("len"), 12_004);
        assert_eq!(dry.read(11_998, 6).expect("read"), [0, 0, 2, 2, 2, 2]);

        assert_eq!(fs_read(&path), original, "the file itself is untouched");
        let _ = std::fs::remove_file(&path);
    }

    fn fs_read(path: &std::path::Path) -> Vec<u8> {
        std::fs::read(path).expect("read the test file back")
    }
}
