//! Human output: aligned tables, relative times ("3m ago"), humanised byte counts, and colour
//! only on a terminal.

use std::io::IsTerminal as _;

/// Prints rows under a header, each column as wide as its widest cell.
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                let pad = widths[i].saturating_sub(c.chars().count());
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| bold(h)).collect());
    for row in rows {
        line(row.clone());
    }
}

/// Bold on a terminal (unless NO_COLOR), plain otherwise. Padding is computed on the plain
/// text, so only the header uses it.
pub fn bold(s: &str) -> String {
    if colour() {
        format!("\x1b[1m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

/// Red on a terminal, for states that mean "cut off".
pub fn alert(s: &str) -> String {
    if colour() {
        format!("\x1b[31m{s}\x1b[0m")
    } else {
        s.to_owned()
    }
}

fn colour() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// "42s", "3m", "2h05m", "3d4h".
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m", s / 60),
        3600..=86_399 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3600),
    }
}

/// "3m ago" for a Unix-ms time in the past.
pub fn ago(then_ms: u64, now_ms: u64) -> String {
    format!("{} ago", duration_ms(now_ms.saturating_sub(then_ms)))
}

/// "in 2h05m", or "expired" when in the past.
pub fn until(then_ms: u64, now_ms: u64) -> String {
    if then_ms <= now_ms {
        "passed".into()
    } else {
        format!("in {}", duration_ms(then_ms - now_ms))
    }
}

/// "512 B", "1.5 KiB", "3.2 MiB".
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn humane_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(180_000), "3m");
        assert_eq!(duration_ms(7_500_000), "2h05m");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
        assert_eq!(ago(1_000, 181_000), "3m ago");
        assert_eq!(until(1_000, 2_000), "passed");
    }
}
