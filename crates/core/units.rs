//! Sizes and times as users type and read them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};

/// "64K", "1M", "65536", "256KiB" → bytes.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .with_context(|| format!("'{s}' is not a size (e.g. 64K, 1M)"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => bail!("'{s}' has an unknown unit (use K, M or G)"),
    };
    n.checked_mul(mult)
        .with_context(|| format!("'{s}' is too large"))
}

/// A rate (`--limit-upload`, `--limit-download`) in bytes per second:
/// a size per second (`50M` = 50 MiB/s; K, M, G are powers of 1024, `/s`
/// optional) or bits per second (`200Mbit`, `1Gbit`, `800kbit`: powers of
/// 1000). A bare number is refused: restic's limits are KiB/s and
/// imgstore's sizes bytes, so it would be too easy to misread.
pub fn parse_rate(s: &str, flag: &str) -> anyhow::Result<u64> {
    let bad = |why: &str| crate::exit::usage(format!("{flag} {s}: {why}"));
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("/s").unwrap_or(&t);
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n > 0.0)
        .ok_or_else(|| bad("not a positive rate (e.g. 50M for 50 MiB/s, 200Mbit)"))?;
    let per_second = match unit.trim() {
        "k" | "kb" | "kib" => n * 1024.0,
        "m" | "mb" | "mib" => n * (1u64 << 20) as f64,
        "g" | "gb" | "gib" => n * (1u64 << 30) as f64,
        "kbit" => n * 1e3 / 8.0,
        "mbit" => n * 1e6 / 8.0,
        "gbit" => n * 1e9 / 8.0,
        "" => {
            return Err(bad(
                "give a unit: K, M or G per second (50M is 50 MiB/s) or kbit, Mbit, Gbit",
            ))
        }
        _ => return Err(bad("unknown unit (use K, M, G or kbit, Mbit, Gbit)")),
    };
    if per_second < 1024.0 {
        return Err(bad("below the smallest limit, 1K (1 KiB/s)"));
    }
    Ok(per_second as u64)
}

/// Bytes in binary units, e.g. "1.5 GiB".
pub fn human_bytes(n: u64) -> String {
    const U: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Nanoseconds since the epoch → "2026-11-25T12:00:00Z".
pub fn format_time(ns: i64) -> String {
    let t = UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// "2026-11-25", "2026-11-25 12:00", "2026-11-25T12:00:00Z" → ns since the
/// epoch (UTC). A time means the end of the period it names (a bare date the
/// end of that day, a time in seconds the end of that second), so "at or
/// before 12:00:00" includes a snapshot listed as taken at 12:00:00.
pub fn parse_time(s: &str) -> anyhow::Result<i64> {
    let t = s.trim();
    let parsed = if t.len() == 10 {
        humantime::parse_rfc3339_weak(&format!("{t} 23:59:59"))
    } else if t.len() == 16 {
        humantime::parse_rfc3339_weak(&format!("{t}:59"))
    } else {
        humantime::parse_rfc3339_weak(t.trim_end_matches('Z'))
    };
    let st: SystemTime = parsed.with_context(|| {
        format!("'{s}' is not a time: use e.g. 2026-11-01 or '2026-11-01 03:00:00' (UTC)")
    })?;
    let ns = st
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0);
    let fractional = t.contains('.');
    Ok(if fractional { ns } else { ns + 999_999_999 })
}

/// Parses a share given as a percentage ("10%") or a fraction ("0.1"); `flag` names it in errors.
pub fn parse_fraction(s: &str, flag: &str) -> anyhow::Result<f64> {
    let bad = || anyhow::anyhow!("{flag} '{s}' is not a percentage: give e.g. 10% or 0.1");
    let f = match s.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map_err(|_| bad())? / 100.0,
        None => s.trim().parse::<f64>().map_err(|_| bad())?,
    };
    if !(f > 0.0 && f <= 1.0) {
        return Err(bad());
    }
    Ok(f)
}

/// "1 snapshot", "2 snapshots": a count with its noun in the right number.
pub fn plural(n: u64, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn sizes_and_times() {
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert!(parse_size("12Q").is_err());
        assert_eq!(human_bytes(1536), "1.5 KiB");
        let ns = parse_time("2026-11-01").unwrap();
        assert_eq!(format_time(ns), "2026-11-01T23:59:59Z");
        assert_eq!(
            format_time(parse_time("2026-11-01 03:00").unwrap()),
            "2026-11-01T03:00:59Z"
        );
        assert_eq!(
            format_time(parse_time("2026-11-01T03:00:00Z").unwrap()),
            "2026-11-01T03:00:00Z"
        );
        assert!(parse_time("yesterday").is_err());
    }
}
