//! Human output: aligned tables, relative times ("3m ago"), humanised byte counts, and colour
//! only on a terminal.

use std::io::IsTerminal as _;

use super::output::outln;
use crate::policy::format_duration;

/// Prints rows under a header, each column as wide as its widest cell.
///
/// # Errors
/// As [`super::output::line`].
pub fn print(header: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let header: Vec<String> = header.iter().map(|h| bold(h)).collect();
    for line in layout(&header, rows) {
        outln!("{line}")?;
    }
    Ok(())
}

/// The lines of the table, padded by what a terminal shows: colour escapes take no room.
fn layout(header: &[String], rows: &[Vec<String>]) -> Vec<String> {
    let mut widths: Vec<usize> = header.iter().map(|h| visible_width(h)).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(visible_width(cell));
            }
        }
    }
    let line = |cells: &[String]| {
        let mut out = String::new();
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.iter().enumerate() {
            out.push_str(c);
            if i != last {
                let pad = widths
                    .get(i)
                    .copied()
                    .unwrap_or(0)
                    .saturating_sub(visible_width(c));
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_owned()
    };
    std::iter::once(line(header))
        .chain(rows.iter().map(|r| line(r)))
        .collect()
}

/// Characters a terminal shows: SGR escapes (`ESC [ … m`) count for nothing.
fn visible_width(s: &str) -> usize {
    let mut width = 0;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // Up to and including the final byte of the escape sequence.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            width += 1;
        }
    }
    width
}

/// Bold on a terminal (unless NO_COLOR), plain otherwise.
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

/// Coarse, for people: "42s", "3m", "2h5m", "3d4h" (two units at most, rounded down).
pub fn duration_ms(ms: u64) -> String {
    let s = ms / 1000;
    let kept = match s {
        0..60 => s,
        60..86_400 => s - s % 60,
        _ => s - s % 3600,
    };
    format_duration(kept)
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

    /// A red cell and a bold header take the room of their text only, so columns line up on
    /// a terminal as they do in a pipe.
    #[test]
    fn colour_escapes_take_no_room() {
        let header = vec![
            "\x1b[1mSTATE\x1b[0m".to_owned(),
            "\x1b[1mUSER\x1b[0m".to_owned(),
        ];
        let rows = vec![
            vec!["\x1b[31mterminated\x1b[0m".to_owned(), "alice".to_owned()],
            vec!["active".to_owned(), "bob".to_owned()],
        ];
        let lines = layout(&header, &rows);
        let plain: Vec<String> = lines
            .iter()
            .map(|l| {
                l.replace("\x1b[1m", "")
                    .replace("\x1b[31m", "")
                    .replace("\x1b[0m", "")
            })
            .collect();
        assert_eq!(
            plain,
            ["STATE       USER", "terminated  alice", "active      bob"],
            "{lines:?}"
        );
        assert_eq!(visible_width("\x1b[31mrevoked\x1b[0m"), 7);
        assert_eq!(visible_width("tcp 10.0.0.7:1 → 10.0.0.2:22"), 28);
    }

    #[test]
    fn humane_units() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 + 200 * 1024), "3.2 MiB");
        assert_eq!(duration_ms(42_000), "42s");
        assert_eq!(duration_ms(180_000), "3m");
        assert_eq!(duration_ms(7_500_000), "2h5m");
        assert_eq!(duration_ms(7_259_000), "2h");
        assert_eq!(duration_ms(3 * 86_400_000 + 4 * 3_600_000), "3d4h");
        assert_eq!(ago(1_000, 181_000), "3m ago");
        assert_eq!(until(1_000, 2_000), "passed");
    }
}
