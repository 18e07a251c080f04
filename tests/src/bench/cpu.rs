//! CPU time as the benches read it: /proc clock ticks of a process, a thread or the machine,
//! and this process's or thread's own CPU clock.

use std::{path::Path, time::Duration};

/// Clock ticks per second, the unit of /proc's CPU times.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads a constant of the system.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// utime + stime of a /proc/…/stat file (a process's or a task's), in clock ticks: fields 14
/// and 15, counted after the command name's ")" since the name may hold spaces. 0 when it
/// cannot be read (the process is gone).
pub fn stat_ticks(stat: &Path) -> u64 {
    let text = std::fs::read_to_string(stat).unwrap_or_default();
    let f: Vec<u64> = (text.rsplit_once(')').map_or("", |(_, r)| r))
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)
}

/// The machine's busy and total clock ticks (the first line of /proc/stat; idle and iowait
/// are not busy).
pub fn machine_ticks() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let m: Vec<u64> = (stat.lines().next().unwrap_or_default().split_whitespace())
        .skip(1)
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    let total: u64 = m.iter().take(8).sum();
    let idle = m.get(3).unwrap_or(&0) + m.get(4).unwrap_or(&0);
    (total.saturating_sub(idle), total)
}

fn clock(id: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(id, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of this process so far, every thread, user and system.
pub fn process_cpu() -> Duration {
    clock(libc::CLOCK_PROCESS_CPUTIME_ID)
}

/// CPU time of the calling thread so far: what a call cost whatever else the machine ran.
pub fn thread_cpu() -> Duration {
    clock(libc::CLOCK_THREAD_CPUTIME_ID)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_read_after_the_command_name() {
        let dir = std::env::temp_dir().join(format!("fw-stat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let stat = dir.join("stat");
        // A command name with spaces and a ")" in it; utime 40, stime 2.
        let fields = "S 1 1 1 0 -1 4194560 100 0 0 0 40 2 0 0 20 0 1 0 5 0 0";
        std::fs::write(&stat, format!("42 (odd) name) {fields}\n")).unwrap();
        assert_eq!(stat_ticks(&stat), 42);
        assert_eq!(stat_ticks(&dir.join("missing")), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_machine_is_never_busier_than_its_total() {
        let (busy, total) = machine_ticks();
        assert!(total > 0 && busy <= total, "busy {busy} of {total}");
    }
}
