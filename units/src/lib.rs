//! The grammar of durations and byte sizes in loraplane's command-line flags, shared by the agent
//! (`loraplane-agent serve --drain-timeout 30s --host-cache-bytes 64GiB`) and the operator
//! (`--agent-drain-timeout 2m`), so one spelling means the same on both sides, and the
//! Kubernetes quantity grammar the operator reads `BaseModel` sizes in ([`quantity`]).
//!
//! A crate of its own because the operator does not depend on the agent (docs/style.md rule 1)
//! and these are not part of the wire protocol that `loraplane-proto` holds.

pub mod quantity;

use std::time::Duration;

/// `30s`, `2m`, `1h`, `500ms`, or plain seconds (fractions allowed: `1.5s`).
///
/// # Errors
/// A message naming the value, for clap to print.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: expected e.g. 30s, 2m, 500ms"))?;
    let secs = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("invalid duration unit {other:?} in {s:?}")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A byte count: a Kubernetes quantity ([`quantity::to_bytes`]: `64Gi`, `1.5G`, `500M`, `7k`,
/// `1e9`, `4096`) or the same with a byte unit (`512MiB`, `2GB`, `4096B`), and `K`/`KB` for
/// 1000. `K`, `M`, `G`, `T`, `P`, `E` are powers of 1000, `Ki`, `Mi`, … powers of 1024; a space
/// may separate the number from its unit.
///
/// # Errors
/// A message naming the value, for clap to print: an unknown unit, a malformed number, or more
/// than `u64::MAX` bytes.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim();
    // The byte spellings, rewritten onto the quantity suffix with the same value.
    let suffix = match unit {
        "B" => "",
        "K" | "KB" => "k",
        "MB" => "M",
        "GB" => "G",
        "TB" => "T",
        u if u.ends_with("iB") => &u[..u.len() - 1],
        u => u,
    };
    quantity::to_bytes(&format!("{num}{suffix}")).map_err(|e| match e {
        quantity::QuantityError::Malformed(_) => {
            format!("invalid size {s:?}: expected e.g. 512MiB, 64Gi, 2G, 4096")
        }
        quantity::QuantityError::Overflow(_) => format!("size {s:?} is too large"),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    /// Every spelling the agent's and the operator's flags accepted before they shared this
    /// grammar still means the same number of bytes.
    #[test]
    fn sizes_in_both_former_grammars() {
        // The agent's former grammar.
        for (s, bytes) in [
            ("4096", 4096),
            ("4096B", 4096),
            ("4096 B", 4096),
            ("2K", 2_000),
            ("2KB", 2_000),
            ("3M", 3_000_000),
            ("3MB", 3_000_000),
            ("3G", 3_000_000_000),
            ("3GB", 3_000_000_000),
            ("1T", 1_000_000_000_000),
            ("1TB", 1_000_000_000_000),
            ("2Ki", 2 << 10),
            ("2KiB", 2 << 10),
            ("2MiB", 2 << 20),
            ("1GiB", 1 << 30),
            ("512 MiB", 512 << 20),
            ("1TiB", 1 << 40),
        ] {
            assert_eq!(parse_bytes(s), Ok(bytes), "{s}");
        }
        // The operator's former grammar (a Kubernetes quantity, `B` after a binary suffix).
        for (s, bytes) in [
            ("16GiB", 16 << 30),
            ("32Mi", 32 << 20),
            ("2G", 2_000_000_000),
            ("7k", 7_000),
            ("1.5Gi", 3 << 29),
            ("1e9", 1_000_000_000),
            ("1Pi", 1 << 50),
            ("1PiB", 1 << 50),
        ] {
            assert_eq!(parse_bytes(s), Ok(bytes), "{s}");
        }
    }

    #[test]
    fn sizes_refused() {
        for bad in ["", "B", "1XB", "-1Gi", "500m", "1.2.3G", "soon"] {
            let e = parse_bytes(bad).unwrap_err();
            assert!(e.contains("invalid size"), "{bad}: {e}");
        }
        let e = parse_bytes("99999999999TiB").unwrap_err();
        assert!(e.contains("too large"), "{e}");
        assert!(parse_bytes("16Ei").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
