//! `imgstore-shaper`: the emulated WAN link of `imgstore-shaper` as a
//! process, for benchmark scripts.
//!
//! ```text
//! imgstore-shaper --upstream 127.0.0.1:8420 --rtt 50ms --rate 200mbit --stats stats.tsv
//! listening 127.0.0.1:40123
//! ```
//!
//! It prints `listening ADDR` on stdout once it accepts, then forwards
//! until killed. With `--stats FILE`, it appends one line per second:
//! seconds since start, bytes forwarded up (client to server) and down
//! since start, and connections accepted.

use std::io::Write;
use std::time::Duration;

use clap::Parser;
use imgstore_shaper::{Dir, Link, Shaper};

#[derive(Parser)]
#[command(
    name = "imgstore-shaper",
    version,
    about = "An emulated WAN link: a TCP proxy adding latency and capping throughput"
)]
struct Args {
    /// Where to forward connections (HOST:PORT).
    #[arg(long)]
    upstream: String,
    /// Where to listen.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Round-trip time added (half each way), e.g. 50ms.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    rtt: Duration,
    /// Cap of both directions: bytes per second, or with a unit: K, M, G
    /// (KiB/s, MiB/s, GiB/s) or kbit, mbit, gbit (10^3, 10^6, 10^9 bits/s).
    #[arg(long, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Cap of client-to-server traffic (as --rate).
    #[arg(long, value_parser = parse_rate)]
    rate_up: Option<u64>,
    /// Cap of server-to-client traffic (as --rate).
    #[arg(long, value_parser = parse_rate)]
    rate_down: Option<u64>,
    /// Appends a line of totals to this file every second.
    #[arg(long)]
    stats: Option<std::path::PathBuf>,
}

/// A rate in bytes per second.
fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("/s").to_ascii_lowercase();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 25M, 200mbit)"))?;
    let factor = match unit {
        "" | "b" => 1.0,
        "k" => 1024.0,
        "m" => (1u64 << 20) as f64,
        "g" => (1u64 << 30) as f64,
        "kbit" => 1e3 / 8.0,
        "mbit" => 1e6 / 8.0,
        "gbit" => 1e9 / 8.0,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (K, M, G, kbit, mbit, gbit)"
            ))
        }
    };
    let r = (n * factor) as u64;
    if r == 0 {
        return Err(format!("{s:?}: a rate must be positive"));
    }
    Ok(r)
}

fn main() {
    let a = Args::parse();
    let link = Link {
        rate_up: a.rate_up.or(a.rate),
        rate_down: a.rate_down.or(a.rate),
        ..Link::rtt(a.rtt)
    };
    let shaper = match Shaper::listen(&a.listen, &a.upstream, link) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "imgstore-shaper: cannot listen on {} for {}: {e}",
                a.listen, a.upstream
            );
            std::process::exit(1);
        }
    };
    println!("listening {}", shaper.addr());
    let _ = std::io::stdout().flush();
    let mut stats = a.stats.as_ref().map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .unwrap_or_else(|e| {
                eprintln!("imgstore-shaper: {}: {e}", p.display());
                std::process::exit(1);
            })
    });
    loop {
        std::thread::sleep(Duration::from_secs(1));
        if let Some(f) = stats.as_mut() {
            let _ = writeln!(
                f,
                "{:.3}\t{}\t{}\t{}",
                shaper.elapsed().as_secs_f64(),
                shaper.bytes(Dir::Up),
                shaper.bytes(Dir::Down),
                shaper.connections()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_rate;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("200mbit").unwrap(), 25_000_000);
        assert_eq!(parse_rate("25M").unwrap(), 25 << 20);
        assert_eq!(parse_rate("1.5k").unwrap(), 1536);
        assert_eq!(parse_rate("1000").unwrap(), 1000);
        assert_eq!(parse_rate("1gbit/s").unwrap(), 125_000_000);
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("0").is_err());
        assert!(parse_rate("3 parsecs").is_err());
    }
}
