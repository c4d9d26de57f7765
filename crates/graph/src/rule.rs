//! Fault rules as compact text, `key=value,...`:
//!
//! ```text
//! ops=read+write,start=0,end=1M,skip=2,count=1,prob=0.5,errno=EIO
//! delay=10ms
//! ```
//!
//! Keys: `ops` (`+`-separated: read, write, flush, discard, write-zeroes;
//! `all` or absent = every op), `start` and `end` (byte offsets with k/M/G/T
//! suffixes; `end` absent or 0 = to the end of the device), `skip`, `count`
//! (0 = forever), `prob` (in [0, 1]; 0 = always), and exactly one action:
//! `errno` (a number in 1..=4095 or a name such as EIO) or `delay` (with a
//! unit: ns, us, ms or s). [`format_rule`] writes the same syntax back.
//!
//! Shared by blkmeshctl (`--rule`) and the configuration file, which also
//! takes a rule as a table of the same keys ([`RuleBuilder`]).

use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::{FaultRule, IoOp};

use crate::size::{format_size, parse_size};

/// Keys a rule accepts, for error messages.
const KEYS: &str = "ops, start, end, skip, count, prob, errno, delay";

/// Largest errno a rule may inject.
const MAX_ERRNO: i32 = 4095;

/// Errno names, Linux values; the first name of a value is used for output.
const ERRNOS: &[(&str, i32)] = &[
    ("EPERM", libc::EPERM),
    ("ENOENT", libc::ENOENT),
    ("EINTR", libc::EINTR),
    ("EIO", libc::EIO),
    ("ENXIO", libc::ENXIO),
    ("E2BIG", libc::E2BIG),
    ("EBADF", libc::EBADF),
    ("EAGAIN", libc::EAGAIN),
    ("EWOULDBLOCK", libc::EWOULDBLOCK),
    ("ENOMEM", libc::ENOMEM),
    ("EACCES", libc::EACCES),
    ("EFAULT", libc::EFAULT),
    ("EBUSY", libc::EBUSY),
    ("EEXIST", libc::EEXIST),
    ("ENODEV", libc::ENODEV),
    ("EINVAL", libc::EINVAL),
    ("EFBIG", libc::EFBIG),
    ("ENOSPC", libc::ENOSPC),
    ("ESPIPE", libc::ESPIPE),
    ("EROFS", libc::EROFS),
    ("EPIPE", libc::EPIPE),
    ("ERANGE", libc::ERANGE),
    ("EDEADLK", libc::EDEADLK),
    ("ENOLCK", libc::ENOLCK),
    ("ENOSYS", libc::ENOSYS),
    ("ENODATA", libc::ENODATA),
    ("ETIME", libc::ETIME),
    ("ENOLINK", libc::ENOLINK),
    ("EPROTO", libc::EPROTO),
    ("EBADMSG", libc::EBADMSG),
    ("EOVERFLOW", libc::EOVERFLOW),
    ("EILSEQ", libc::EILSEQ),
    ("ENOTSUP", libc::ENOTSUP),
    ("EOPNOTSUPP", libc::EOPNOTSUPP),
    ("ECONNRESET", libc::ECONNRESET),
    ("ENOBUFS", libc::ENOBUFS),
    ("ETIMEDOUT", libc::ETIMEDOUT),
    ("ECONNREFUSED", libc::ECONNREFUSED),
    ("EHOSTDOWN", libc::EHOSTDOWN),
    ("ESTALE", libc::ESTALE),
    ("EREMOTEIO", libc::EREMOTEIO),
    ("EDQUOT", libc::EDQUOT),
    ("ENOMEDIUM", libc::ENOMEDIUM),
    ("EMEDIUMTYPE", libc::EMEDIUMTYPE),
    ("ECANCELED", libc::ECANCELED),
];

/// Op names, in the order `format_rule` writes them.
const OPS: &[(&str, IoOp)] = &[
    ("read", IoOp::Read),
    ("write", IoOp::Write),
    ("flush", IoOp::Flush),
    ("discard", IoOp::Discard),
    ("write-zeroes", IoOp::WriteZeroes),
];

/// Duration units, largest first.
const UNITS: &[(&str, u64)] = &[
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

/// Parses an errno: a number in 1..=4095 or a name (case-insensitive).
pub fn parse_errno(s: &str) -> Result<i32, String> {
    let t = s.trim();
    if let Ok(n) = t.parse::<i64>() {
        return i32::try_from(n)
            .ok()
            .filter(|n| (1..=MAX_ERRNO).contains(n))
            .ok_or_else(|| format!("must be in 1..={MAX_ERRNO} (got {n})"));
    }
    ERRNOS
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(t))
        .map(|&(_, n)| n)
        .ok_or_else(|| {
            format!("unknown errno {s:?} (use a number or a name such as EIO, ENOSPC, EROFS)")
        })
}

/// The name of an errno if it has one, else its number.
pub fn errno_name(n: i32) -> String {
    ERRNOS
        .iter()
        .find(|&&(_, v)| v == n)
        .map_or_else(|| n.to_string(), |(name, _)| (*name).to_string())
}

/// Parses a duration with a unit (`100ns`, `5us`, `10ms`, `1s`) into nanoseconds.
pub fn parse_duration_ns(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(digits_end);
    let mult = UNITS
        .iter()
        .find(|(u, _)| *u == unit)
        .map(|&(_, m)| m)
        .filter(|_| !digits.is_empty())
        .ok_or_else(|| {
            format!("invalid duration {s:?} (expected a number with ns, us, ms or s)")
        })?;
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Formats nanoseconds with the largest unit that divides them.
pub fn format_duration_ns(ns: u64) -> String {
    let &(unit, mult) = UNITS
        .iter()
        .find(|&&(_, m)| ns % m == 0)
        .unwrap_or(&("ns", 1));
    format!("{}{unit}", ns / mult)
}

/// Name of an op as written in rules, or its number if unknown.
pub fn op_name(op: i32) -> String {
    OPS.iter()
        .find(|&&(_, o)| o as i32 == op)
        .map_or_else(|| op.to_string(), |(name, _)| (*name).to_string())
}

fn parse_ops(s: &str) -> Result<Vec<i32>, String> {
    if s.eq_ignore_ascii_case("all") {
        return Ok(Vec::new());
    }
    s.split('+')
        .map(|name| {
            let name = name.trim();
            OPS.iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name) || n.replace('-', "_") == name)
                .map(|&(_, op)| op as i32)
                .ok_or_else(|| {
                    format!(
                        "unknown op {name:?} (use read, write, flush, discard, write-zeroes, \
                         joined with +, or all)"
                    )
                })
        })
        .collect()
}

fn parse_u64(s: &str) -> Result<u64, String> {
    s.trim()
        .parse::<u64>()
        .map_err(|_| format!("invalid number {s:?}"))
}

fn parse_probability(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if p.is_finite() && (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!("must be a number in [0, 1] (got {s:?})")),
    }
}

/// Builds a rule key by key (the keys of [`parse_rule`]); errors name the
/// problem, not the key (callers know where the value came from).
#[derive(Debug, Default)]
pub struct RuleBuilder {
    rule: FaultRule,
    seen: Vec<&'static str>,
}

/// Every key of a rule.
pub const RULE_KEYS: [&str; 8] = [
    "ops", "start", "end", "skip", "count", "prob", "errno", "delay",
];

impl RuleBuilder {
    /// Sets `key` from its text `value`.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), String> {
        let Some(&key) = RULE_KEYS.iter().find(|k| **k == key) else {
            return Err(format!("unknown key (expected one of {KEYS})"));
        };
        if self.seen.contains(&key) {
            return Err("given twice".to_string());
        }
        let rule = &mut self.rule;
        match key {
            "ops" => rule.ops = parse_ops(value)?,
            "start" => rule.offset_start = parse_size(value)?,
            "end" => rule.offset_end = parse_size(value)?,
            "skip" => rule.skip = parse_u64(value)?,
            "count" => rule.count = parse_u64(value)?,
            "prob" => rule.probability = parse_probability(value)?,
            _ => {
                if let Some(other) = self.seen.iter().find(|k| matches!(**k, "errno" | "delay")) {
                    return Err(format!(
                        "a rule has one action, errno or delay (already got {other})"
                    ));
                }
                rule.action = Some(if key == "errno" {
                    Action::Errno(parse_errno(value)?)
                } else {
                    Action::DelayNs(parse_duration_ns(value)?)
                });
            }
        }
        self.seen.push(key);
        Ok(())
    }

    /// The rule, once it has an action.
    pub fn finish(self) -> Result<FaultRule, String> {
        if self.rule.action.is_none() {
            return Err("needs an action: errno or delay".to_string());
        }
        Ok(self.rule)
    }
}

/// Parses a rule (see the module docs). Errors name the bad key.
pub fn parse_rule(s: &str) -> Result<FaultRule, String> {
    let mut rule = RuleBuilder::default();
    for part in s.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(format!("empty key=value pair in rule {s:?}"));
        }
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("key {part:?}: expected key=value"))?;
        let key = key.trim();
        rule.set(key, value)
            .map_err(|e| format!("key {key:?}: {e}"))?;
    }
    rule.finish()
        .map_err(|_| format!("rule {s:?} needs an action: errno=... or delay=..."))
}

/// Writes a rule in the syntax [`parse_rule`] reads, leaving out defaults.
pub fn format_rule(r: &FaultRule) -> String {
    let mut parts = Vec::new();
    if !r.ops.is_empty() {
        let ops: Vec<String> = r.ops.iter().map(|&op| op_name(op)).collect();
        parts.push(format!("ops={}", ops.join("+")));
    }
    if r.offset_start != 0 {
        parts.push(format!("start={}", format_size(r.offset_start)));
    }
    if r.offset_end != 0 {
        parts.push(format!("end={}", format_size(r.offset_end)));
    }
    if r.skip != 0 {
        parts.push(format!("skip={}", r.skip));
    }
    if r.count != 0 {
        parts.push(format!("count={}", r.count));
    }
    if r.probability != 0.0 {
        parts.push(format!("prob={}", r.probability));
    }
    match r.action {
        Some(Action::Errno(e)) => parts.push(format!("errno={}", errno_name(e))),
        Some(Action::DelayNs(d)) => parts.push(format!("delay={}", format_duration_ns(d))),
        None => parts.push("no-action".into()),
    }
    parts.join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_errno_rule() {
        let r =
            parse_rule("ops=read+write,start=0,end=1M,skip=2,count=1,prob=0.5,errno=EIO").unwrap();
        assert_eq!(
            r,
            FaultRule {
                ops: vec![IoOp::Read as i32, IoOp::Write as i32],
                offset_start: 0,
                offset_end: 1 << 20,
                skip: 2,
                count: 1,
                probability: 0.5,
                action: Some(Action::Errno(5)),
            }
        );
    }

    #[test]
    fn parses_delay_only_rule() {
        let r = parse_rule("delay=10ms").unwrap();
        assert_eq!(r.action, Some(Action::DelayNs(10_000_000)));
        assert!(r.ops.is_empty());
    }

    #[test]
    fn parses_errno_names_and_numbers() {
        assert_eq!(parse_errno("EIO").unwrap(), 5);
        assert_eq!(parse_errno("enospc").unwrap(), 28);
        assert_eq!(parse_errno("EROFS").unwrap(), 30);
        assert_eq!(parse_errno("ENOTSUP").unwrap(), 95);
        assert_eq!(parse_errno("EOPNOTSUPP").unwrap(), 95);
        assert_eq!(parse_errno("ETIMEDOUT").unwrap(), 110);
        assert_eq!(parse_errno("EAGAIN").unwrap(), 11);
        assert_eq!(parse_errno("ENODATA").unwrap(), 61);
        assert_eq!(parse_errno("EBADMSG").unwrap(), 74);
        assert_eq!(parse_errno("28").unwrap(), 28);
        for bad in ["0", "-5", "4096", "99999999999", "EFROB", ""] {
            assert!(parse_errno(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parses_durations_with_units() {
        assert_eq!(parse_duration_ns("100ns").unwrap(), 100);
        assert_eq!(parse_duration_ns("5us").unwrap(), 5_000);
        assert_eq!(parse_duration_ns("10ms").unwrap(), 10_000_000);
        assert_eq!(parse_duration_ns("2s").unwrap(), 2_000_000_000);
        for bad in ["10", "ms", "1.5ms", "10m", "-1s", "99999999999999999999s"] {
            assert!(parse_duration_ns(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rejects_unknown_key_naming_it() {
        let e = parse_rule("errno=EIO,frob=1").unwrap_err();
        assert!(e.starts_with("key \"frob\": unknown key"), "{e}");
    }

    #[test]
    fn rejects_bad_values_naming_the_key() {
        for (rule, key) in [
            ("errno=EFROB", "errno"),
            ("delay=10", "delay"),
            ("ops=read+frob,errno=5", "ops"),
            ("start=1X,errno=5", "start"),
            ("end=x,errno=5", "end"),
            ("skip=-1,errno=5", "skip"),
            ("count=a,errno=5", "count"),
            ("prob=1.5,errno=5", "prob"),
            ("prob=nan,errno=5", "prob"),
            ("errno=5,delay=1s", "delay"),
            ("errno=5,errno=6", "errno"),
            ("errno", "errno"),
        ] {
            let e = parse_rule(rule).unwrap_err();
            assert!(e.starts_with(&format!("key {key:?}:")), "{rule}: {e}");
        }
    }

    #[test]
    fn rejects_rule_without_action() {
        let e = parse_rule("ops=read").unwrap_err();
        assert!(e.contains("needs an action"), "{e}");
        assert!(parse_rule("").is_err());
        assert!(parse_rule("errno=5,").is_err());
    }

    #[test]
    fn format_rule_round_trips() {
        for text in [
            "ops=read+write,start=4k,end=1M,skip=2,count=1,prob=0.5,errno=EIO",
            "ops=flush+discard+write-zeroes,delay=10ms",
            "errno=ENOSPC",
            "errno=1234",
            "delay=7ns",
        ] {
            let r = parse_rule(text).unwrap();
            assert_eq!(format_rule(&r), text);
            assert_eq!(parse_rule(&format_rule(&r)).unwrap(), r);
        }
    }
}
