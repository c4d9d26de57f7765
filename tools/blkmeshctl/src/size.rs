//! Byte sizes with binary suffixes: `512`, `4k`, `1M`, `1G`, `2T` (also `1GiB`, `1GB`).

const UNITS: [(char, u64); 4] = [
    ('T', 1 << 40),
    ('G', 1 << 30),
    ('M', 1 << 20),
    ('K', 1 << 10),
];

/// Parses a size; suffixes are powers of 1024 and case-insensitive.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix('B'))
        .or_else(|| t.strip_suffix('b'))
        .unwrap_or(t);
    let (digits, mult) = match t.chars().last() {
        Some(c) if c.is_ascii_alphabetic() => {
            let up = c.to_ascii_uppercase();
            let mult = UNITS
                .iter()
                .find(|(u, _)| *u == up)
                .map(|(_, m)| *m)
                .ok_or_else(|| format!("unknown size suffix {c:?} in {s:?} (use k, M, G or T)"))?;
            (&t[..t.len() - c.len_utf8()], mult)
        }
        _ => (t, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid size {s:?} (expected a number with an optional k/M/G/T suffix)"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {s:?} is too large"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Formats a size exactly, with the largest suffix that divides it.
pub fn format_size(n: u64) -> String {
    if n == 0 {
        return "0".into();
    }
    for (u, m) in UNITS {
        if n % m == 0 {
            let u = if u == 'K' { 'k' } else { u };
            return format!("{}{u}", n / m);
        }
    }
    n.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2t").unwrap(), 2 << 40);
    }

    #[test]
    fn rejects_bad_sizes() {
        for s in ["", "G", "1X", "-1", "1.5G", "99999999999T", "1 G G"] {
            assert!(parse_size(s).is_err(), "{s:?}");
        }
    }

    #[test]
    fn formats_with_largest_exact_suffix() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(7168), "7k");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size((1 << 30) + (1 << 20)), "1025M");
    }
}
