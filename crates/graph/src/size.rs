//! Byte sizes with binary suffixes, as every blkmesh tool writes them:
//! `512`, `4k`, `1M`, `1G`, `2T` (also `1GiB`, `1GB`; suffixes are powers of
//! 1024 and case-insensitive). Shared by the configuration file, blkmeshctl
//! and `blkmesh up`.

const UNITS: [(char, u64); 4] = [
    ('T', 1 << 40),
    ('G', 1 << 30),
    ('M', 1 << 20),
    ('K', 1 << 10),
];

/// Parses a size: a number of bytes with an optional k/M/G/T suffix.
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

/// Parses a size that must fit in 32 bits.
pub fn parse_size_u32(s: &str) -> Result<u32, String> {
    u32::try_from(parse_size(s)?).map_err(|_| format!("size {s:?} is too large (at most 4G - 1)"))
}

/// Formats a size exactly, with the largest suffix that divides it, in the
/// syntax [`parse_size`] reads: `0`, `1000`, `7k`, `3G`.
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

/// Formats a byte count for people: `64 MiB`, `1 GiB`, `1536 KiB`, `1000 bytes`.
pub fn format_size_iec(n: u64) -> String {
    for (u, m) in UNITS {
        if n >= m && n % m == 0 {
            return format!("{} {u}iB", n / m);
        }
    }
    format!("{n} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_suffixed_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("4K").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        assert_eq!(parse_size(" 2t ").unwrap(), 2 << 40);
    }

    #[test]
    fn parses_32_bit_sizes() {
        assert_eq!(parse_size_u32("4k").unwrap(), 4096);
        assert!(parse_size_u32("4G").is_err());
    }

    #[test]
    fn rejects_bad_sizes() {
        for s in [
            "",
            "G",
            "1X",
            "-1",
            "1.5G",
            "99999999999T",
            "99999999999999999999",
            "1 G G",
            "ü",
        ] {
            assert!(parse_size(s).is_err(), "{s:?}");
        }
        let e = parse_size("1X").unwrap_err();
        assert!(e.contains("unknown size suffix 'X'"), "{e}");
    }

    #[test]
    fn formats_with_largest_exact_suffix() {
        assert_eq!(format_size(0), "0");
        assert_eq!(format_size(1000), "1000");
        assert_eq!(format_size(7168), "7k");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size((1 << 30) + (1 << 20)), "1025M");
        for n in [0, 512, 7168, 3 << 30, 5 << 40] {
            assert_eq!(parse_size(&format_size(n)).unwrap(), n);
        }
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_size_iec(64 << 20), "64 MiB");
        assert_eq!(format_size_iec(1 << 30), "1 GiB");
        assert_eq!(format_size_iec(1536 << 10), "1536 KiB");
        assert_eq!(format_size_iec(1000), "1000 bytes");
        assert_eq!(format_size_iec(0), "0 bytes");
    }
}
