//! Parser for the qemu-io–style commands given with `-c`.
//!
//! Grammar (whitespace-separated words, options before positionals):
//!
//! ```text
//! write        [-P pattern] [-q queue] OFF LEN
//! read         [-P pattern] [-q queue] OFF LEN
//! writev       [-P pattern] [-q queue] OFF LEN [LEN ...]
//! readv        [-P pattern] [-q queue] OFF LEN [LEN ...]
//! flush        [-q queue]
//! discard      [-q queue] OFF LEN
//! write_zeroes [-u] [-q queue] OFF LEN
//! info
//! zone_report    [-q queue] [OFF [COUNT]]      (alias zrp)
//! zone_open      [-q queue] OFF                (alias zo)
//! zone_close     [-q queue] OFF                (alias zc)
//! zone_finish    [-q queue] OFF                (alias zf)
//! zone_reset     [-q queue] OFF                (alias zrs)
//! zone_reset_all [-q queue]
//! zone_append    [-P pattern] [-q queue] OFF LEN   (alias zap)
//! ```
//!
//! Sizes and offsets are plain bytes or take a k/K, m/M, g/G, t/T suffix
//! (powers of 1024). Patterns are bytes, decimal or `0x` hex. Zone
//! commands need a zoned device and the native driver; OFF is a zone's
//! start for the zone actions and appends, any offset in the first zone
//! for a report (COUNT: how many zones, default all to the end).

use thiserror::Error;

pub use crate::native::ZoneAction;

/// Pattern written by `write`/`writev` when `-P` is not given (qemu-io's).
pub const DEFAULT_WRITE_PATTERN: u8 = 0xcd;

/// One parsed `-c` command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// `read`/`readv`: one iovec per entry of `lens`; `readv` may have many.
    Read {
        offset: u64,
        lens: Vec<u64>,
        vectored: bool,
        pattern: Option<u8>,
        queue: usize,
    },
    /// `write`/`writev`.
    Write {
        offset: u64,
        lens: Vec<u64>,
        vectored: bool,
        pattern: u8,
        queue: usize,
    },
    Flush {
        queue: usize,
    },
    Discard {
        offset: u64,
        len: u64,
        queue: usize,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
        may_unmap: bool,
        queue: usize,
    },
    Info,
    /// `zone_report`: zones from the one holding `offset`; `count` of
    /// them, or all to the end.
    ZoneReport {
        offset: u64,
        count: Option<u32>,
        queue: usize,
    },
    /// `zone_open`, `zone_close`, `zone_finish`, `zone_reset`,
    /// `zone_reset_all` (offset 0).
    ZoneAction {
        action: ZoneAction,
        offset: u64,
        queue: usize,
    },
    /// `zone_append`: `len` bytes of `pattern` to the zone at `offset`.
    ZoneAppend {
        offset: u64,
        len: u64,
        pattern: u8,
        queue: usize,
    },
}

impl Command {
    /// The command's name as the user typed it.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Read {
                vectored: false, ..
            } => "read",
            Command::Read { vectored: true, .. } => "readv",
            Command::Write {
                vectored: false, ..
            } => "write",
            Command::Write { vectored: true, .. } => "writev",
            Command::Flush { .. } => "flush",
            Command::Discard { .. } => "discard",
            Command::WriteZeroes { .. } => "write_zeroes",
            Command::Info => "info",
            Command::ZoneReport { .. } => "zone_report",
            Command::ZoneAction { action, .. } => match action {
                ZoneAction::Open => "zone_open",
                ZoneAction::Close => "zone_close",
                ZoneAction::Finish => "zone_finish",
                ZoneAction::Reset => "zone_reset",
                ZoneAction::ResetAll => "zone_reset_all",
            },
            Command::ZoneAppend { .. } => "zone_append",
        }
    }

    /// Whether this is a zone command (which only the native driver runs).
    pub fn is_zone(&self) -> bool {
        matches!(
            self,
            Command::ZoneReport { .. } | Command::ZoneAction { .. } | Command::ZoneAppend { .. }
        )
    }

    /// The queue the command runs on (`info` uses none; reported as 0).
    pub fn queue(&self) -> usize {
        match self {
            Command::Read { queue, .. }
            | Command::Write { queue, .. }
            | Command::Flush { queue }
            | Command::Discard { queue, .. }
            | Command::WriteZeroes { queue, .. }
            | Command::ZoneReport { queue, .. }
            | Command::ZoneAction { queue, .. }
            | Command::ZoneAppend { queue, .. } => *queue,
            Command::Info => 0,
        }
    }

    /// Data bytes moved through I/O buffers (0 for commands without data).
    pub fn data_len(&self) -> u64 {
        match self {
            Command::Read { lens, .. } | Command::Write { lens, .. } => lens.iter().sum(),
            Command::ZoneAppend { len, .. } => *len,
            Command::Flush { .. }
            | Command::Discard { .. }
            | Command::WriteZeroes { .. }
            | Command::Info
            | Command::ZoneReport { .. }
            | Command::ZoneAction { .. } => 0,
        }
    }
}

/// Why a command line could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParseError {
    #[error("empty command")]
    Empty,
    #[error("unknown command '{0}'")]
    UnknownCommand(String),
    #[error("{cmd}: unknown option '{opt}'")]
    UnknownOption { cmd: &'static str, opt: String },
    #[error("{cmd}: option '{opt}' needs a value")]
    MissingOptionValue {
        cmd: &'static str,
        opt: &'static str,
    },
    #[error("{cmd}: missing argument {what}; usage: {usage}")]
    MissingArgument {
        cmd: &'static str,
        what: &'static str,
        usage: &'static str,
    },
    #[error("{cmd}: unexpected argument '{arg}'; usage: {usage}")]
    ExtraArgument {
        cmd: &'static str,
        arg: String,
        usage: &'static str,
    },
    #[error("{cmd}: invalid {what} '{value}': {reason}")]
    BadNumber {
        cmd: &'static str,
        what: &'static str,
        value: String,
        reason: SizeError,
    },
    #[error("{cmd}: pattern '{value}' is not a byte (0..=255 or 0x00..=0xff)")]
    BadPattern { cmd: &'static str, value: String },
    #[error("{cmd}: {what} + length overflows")]
    Overflow {
        cmd: &'static str,
        what: &'static str,
    },
    #[error("{cmd}: {what} must not be 0")]
    Zero {
        cmd: &'static str,
        what: &'static str,
    },
}

/// Why a size or offset string is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SizeError {
    #[error("empty")]
    Empty,
    #[error("not a number")]
    NotANumber,
    #[error("unknown suffix (use k, m, g, t or none)")]
    BadSuffix,
    #[error("too large")]
    Overflow,
}

/// Parses `4096`, `4k`, `1M`, `2g`, `0x1000` (hex only without suffix).
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let s = s.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::NotANumber);
    }
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, suffix) = s.split_at(digits_end);
    if digits.is_empty() {
        return Err(SizeError::NotANumber);
    }
    let value: u64 = digits.parse().map_err(|_| SizeError::Overflow)?;
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        _ => return Err(SizeError::BadSuffix),
    };
    value.checked_mul(1u64 << shift).ok_or(SizeError::Overflow)
}

/// Parses a pattern byte: decimal `171` or hex `0xab`.
pub fn parse_byte(s: &str) -> Option<u8> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

struct Spec {
    name: &'static str,
    /// qemu-io's short name, if any.
    alias: Option<&'static str>,
    usage: &'static str,
    pattern: bool,
    unmap: bool,
    queue: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        alias: None,
        name: "read",
        usage: "read [-P pattern] [-q queue] OFF LEN",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "write",
        usage: "write [-P pattern] [-q queue] OFF LEN",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "readv",
        usage: "readv [-P pattern] [-q queue] OFF LEN [LEN ...]",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "writev",
        usage: "writev [-P pattern] [-q queue] OFF LEN [LEN ...]",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "flush",
        usage: "flush [-q queue]",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "discard",
        usage: "discard [-q queue] OFF LEN",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "write_zeroes",
        usage: "write_zeroes [-u] [-q queue] OFF LEN",
        pattern: false,
        unmap: true,
        queue: true,
    },
    Spec {
        alias: None,
        name: "info",
        usage: "info",
        pattern: false,
        unmap: false,
        queue: false,
    },
    Spec {
        alias: Some("zrp"),
        name: "zone_report",
        usage: "zone_report [-q queue] [OFF [COUNT]]",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: Some("zo"),
        name: "zone_open",
        usage: "zone_open [-q queue] OFF",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: Some("zc"),
        name: "zone_close",
        usage: "zone_close [-q queue] OFF",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: Some("zf"),
        name: "zone_finish",
        usage: "zone_finish [-q queue] OFF",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: Some("zrs"),
        name: "zone_reset",
        usage: "zone_reset [-q queue] OFF",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: None,
        name: "zone_reset_all",
        usage: "zone_reset_all [-q queue]",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        alias: Some("zap"),
        name: "zone_append",
        usage: "zone_append [-P pattern] [-q queue] OFF LEN",
        pattern: true,
        unmap: false,
        queue: true,
    },
];

/// Parses one `-c` command line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let mut words = line.split_whitespace();
    let name = words.next().ok_or(ParseError::Empty)?;
    let spec = SPECS
        .iter()
        .find(|s| s.name == name || s.alias == Some(name))
        .ok_or_else(|| ParseError::UnknownCommand(name.to_string()))?;
    let cmd = spec.name;

    let mut pattern = None;
    let mut unmap = false;
    let mut queue = 0usize;
    let mut positional: Vec<&str> = Vec::new();
    while let Some(word) = words.next() {
        // Options come before positionals, as in qemu-io (getopt).
        if positional.is_empty() && word.starts_with('-') && word.len() > 1 {
            match word {
                "-P" if spec.pattern => {
                    let v = words
                        .next()
                        .ok_or(ParseError::MissingOptionValue { cmd, opt: "-P" })?;
                    pattern = Some(parse_byte(v).ok_or_else(|| ParseError::BadPattern {
                        cmd,
                        value: v.to_string(),
                    })?);
                }
                "-q" | "--queue" if spec.queue => {
                    let v = words
                        .next()
                        .ok_or(ParseError::MissingOptionValue { cmd, opt: "-q" })?;
                    queue = v.parse().map_err(|_| ParseError::BadNumber {
                        cmd,
                        what: "queue",
                        value: v.to_string(),
                        reason: SizeError::NotANumber,
                    })?;
                }
                "-u" if spec.unmap => unmap = true,
                _ => {
                    return Err(ParseError::UnknownOption {
                        cmd,
                        opt: word.to_string(),
                    })
                }
            }
        } else {
            positional.push(word);
        }
    }

    let number = |what: &'static str, s: &str| {
        parse_size(s).map_err(|reason| ParseError::BadNumber {
            cmd,
            what,
            value: s.to_string(),
            reason,
        })
    };
    let missing = |what: &'static str| ParseError::MissingArgument {
        cmd,
        what,
        usage: spec.usage,
    };
    let extra = |arg: &str| ParseError::ExtraArgument {
        cmd,
        arg: arg.to_string(),
        usage: spec.usage,
    };
    // OFF LEN, exactly.
    let off_len = |positional: &[&str]| -> Result<(u64, u64), ParseError> {
        let off = number("offset", positional.first().ok_or_else(|| missing("OFF"))?)?;
        let len = number("length", positional.get(1).ok_or_else(|| missing("LEN"))?)?;
        if let Some(arg) = positional.get(2) {
            return Err(extra(arg));
        }
        off.checked_add(len).ok_or(ParseError::Overflow {
            cmd,
            what: "offset",
        })?;
        Ok((off, len))
    };

    let command = match cmd {
        "read" | "write" => {
            let (offset, len) = off_len(&positional)?;
            rw(cmd == "read", offset, vec![len], false, pattern, queue)
        }
        "readv" | "writev" => {
            let offset = number("offset", positional.first().ok_or_else(|| missing("OFF"))?)?;
            if positional.len() < 2 {
                return Err(missing("LEN"));
            }
            let lens = positional[1..]
                .iter()
                .map(|s| number("length", s))
                .collect::<Result<Vec<_>, _>>()?;
            lens.iter()
                .try_fold(offset, |acc, l| acc.checked_add(*l))
                .ok_or(ParseError::Overflow {
                    cmd,
                    what: "offset",
                })?;
            rw(cmd == "readv", offset, lens, true, pattern, queue)
        }
        "flush" => {
            if let Some(arg) = positional.first() {
                return Err(extra(arg));
            }
            Command::Flush { queue }
        }
        "discard" => {
            let (offset, len) = off_len(&positional)?;
            Command::Discard { offset, len, queue }
        }
        "write_zeroes" => {
            let (offset, len) = off_len(&positional)?;
            Command::WriteZeroes {
                offset,
                len,
                may_unmap: unmap,
                queue,
            }
        }
        "zone_report" => {
            if let Some(arg) = positional.get(2) {
                return Err(extra(arg));
            }
            let offset = match positional.first() {
                Some(s) => number("offset", s)?,
                None => 0,
            };
            let count = match positional.get(1) {
                Some(s) => {
                    let n = number("count", s)?;
                    if n == 0 {
                        return Err(ParseError::Zero { cmd, what: "COUNT" });
                    }
                    Some(u32::try_from(n).map_err(|_| ParseError::BadNumber {
                        cmd,
                        what: "count",
                        value: s.to_string(),
                        reason: SizeError::Overflow,
                    })?)
                }
                None => None,
            };
            Command::ZoneReport {
                offset,
                count,
                queue,
            }
        }
        "zone_open" | "zone_close" | "zone_finish" | "zone_reset" => {
            let offset = number("offset", positional.first().ok_or_else(|| missing("OFF"))?)?;
            if let Some(arg) = positional.get(1) {
                return Err(extra(arg));
            }
            let action = match cmd {
                "zone_open" => ZoneAction::Open,
                "zone_close" => ZoneAction::Close,
                "zone_finish" => ZoneAction::Finish,
                _ => ZoneAction::Reset,
            };
            Command::ZoneAction {
                action,
                offset,
                queue,
            }
        }
        "zone_reset_all" => {
            if let Some(arg) = positional.first() {
                return Err(extra(arg));
            }
            Command::ZoneAction {
                action: ZoneAction::ResetAll,
                offset: 0,
                queue,
            }
        }
        "zone_append" => {
            let (offset, len) = off_len(&positional)?;
            Command::ZoneAppend {
                offset,
                len,
                pattern: pattern.unwrap_or(DEFAULT_WRITE_PATTERN),
                queue,
            }
        }
        _ => {
            if let Some(arg) = positional.first() {
                return Err(extra(arg));
            }
            Command::Info
        }
    };
    Ok(command)
}

fn rw(
    read: bool,
    offset: u64,
    lens: Vec<u64>,
    vectored: bool,
    pattern: Option<u8>,
    queue: usize,
) -> Command {
    if read {
        Command::Read {
            offset,
            lens,
            vectored,
            pattern,
            queue,
        }
    } else {
        Command::Write {
            offset,
            lens,
            vectored,
            pattern: pattern.unwrap_or(DEFAULT_WRITE_PATTERN),
            queue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes_with_suffixes() {
        assert_eq!(parse_size("0"), Ok(0));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("0x1000"), Ok(4096));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert_eq!(parse_size("4x"), Err(SizeError::BadSuffix));
        assert_eq!(parse_size("4kb"), Err(SizeError::BadSuffix));
        assert_eq!(parse_size("k"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("-1"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("0xzz"), Err(SizeError::NotANumber));
        assert_eq!(parse_size("99999999999999999999"), Err(SizeError::Overflow));
        assert_eq!(parse_size("17179869184G"), Err(SizeError::Overflow));
    }

    #[test]
    fn parses_write_with_default_pattern() {
        assert_eq!(
            parse("write 0 64k"),
            Ok(Command::Write {
                offset: 0,
                lens: vec![65536],
                vectored: false,
                pattern: 0xcd,
                queue: 0
            })
        );
    }

    #[test]
    fn parses_read_with_pattern_and_queue() {
        assert_eq!(
            parse("read -P 0xab -q 1 1M 4k"),
            Ok(Command::Read {
                offset: 1 << 20,
                lens: vec![4096],
                vectored: false,
                pattern: Some(0xab),
                queue: 1
            })
        );
        assert_eq!(
            parse("  read   -P 171   0 512 "),
            Ok(Command::Read {
                offset: 0,
                lens: vec![512],
                vectored: false,
                pattern: Some(171),
                queue: 0
            })
        );
    }

    #[test]
    fn parses_readv_with_several_iovecs() {
        assert_eq!(
            parse("readv -P 0xab 0 4k 512 3584"),
            Ok(Command::Read {
                offset: 0,
                lens: vec![4096, 512, 3584],
                vectored: true,
                pattern: Some(0xab),
                queue: 0
            })
        );
        let cmd = parse("writev -P 1 8k 1k 3k").unwrap();
        assert_eq!(cmd.data_len(), 4096);
        assert_eq!(cmd.name(), "writev");
    }

    #[test]
    fn parses_other_commands() {
        assert_eq!(parse("flush"), Ok(Command::Flush { queue: 0 }));
        assert_eq!(parse("flush -q 3"), Ok(Command::Flush { queue: 3 }));
        assert_eq!(
            parse("discard 0 1M"),
            Ok(Command::Discard {
                offset: 0,
                len: 1 << 20,
                queue: 0
            })
        );
        assert_eq!(
            parse("write_zeroes -u 4k 8k"),
            Ok(Command::WriteZeroes {
                offset: 4096,
                len: 8192,
                may_unmap: true,
                queue: 0
            })
        );
        assert_eq!(
            parse("write_zeroes 0 512"),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 512,
                may_unmap: false,
                queue: 0
            })
        );
        assert_eq!(parse("info"), Ok(Command::Info));
    }

    #[test]
    fn rejects_unknown_command() {
        assert_eq!(
            parse("frobnicate 0 4k"),
            Err(ParseError::UnknownCommand("frobnicate".into()))
        );
        assert_eq!(parse(""), Err(ParseError::Empty));
        assert_eq!(parse("   "), Err(ParseError::Empty));
    }

    #[test]
    fn rejects_bad_size_suffix() {
        assert!(matches!(
            parse("read 0 4q"),
            Err(ParseError::BadNumber {
                what: "length",
                reason: SizeError::BadSuffix,
                ..
            })
        ));
        assert!(matches!(
            parse("write 1x 4k"),
            Err(ParseError::BadNumber {
                what: "offset",
                reason: SizeError::BadSuffix,
                ..
            })
        ));
    }

    #[test]
    fn rejects_missing_arguments() {
        assert!(matches!(
            parse("read"),
            Err(ParseError::MissingArgument { what: "OFF", .. })
        ));
        assert!(matches!(
            parse("write -P 0xab 0"),
            Err(ParseError::MissingArgument { what: "LEN", .. })
        ));
        assert!(matches!(
            parse("readv 0"),
            Err(ParseError::MissingArgument { what: "LEN", .. })
        ));
        assert!(matches!(
            parse("read -P"),
            Err(ParseError::MissingOptionValue { opt: "-P", .. })
        ));
        assert!(matches!(
            parse("read -q"),
            Err(ParseError::MissingOptionValue { opt: "-q", .. })
        ));
    }

    #[test]
    fn rejects_pattern_that_is_not_a_byte() {
        for bad in ["256", "0x100", "-1", "abc", "0x"] {
            assert!(
                matches!(
                    parse(&format!("write -P {bad} 0 4k")),
                    Err(ParseError::BadPattern { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_extra_arguments_and_unknown_options() {
        assert!(matches!(
            parse("read 0 4k 4k"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("flush 0"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("info now"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("read -z 0 4k"),
            Err(ParseError::UnknownOption { .. })
        ));
        // -u only makes sense for write_zeroes, -P not for discard.
        assert!(matches!(
            parse("write -u 0 4k"),
            Err(ParseError::UnknownOption { .. })
        ));
        assert!(matches!(
            parse("discard -P 1 0 4k"),
            Err(ParseError::UnknownOption { .. })
        ));
        assert!(matches!(
            parse("read -q x 0 4k"),
            Err(ParseError::BadNumber { what: "queue", .. })
        ));
    }

    #[test]
    fn parses_zone_commands() {
        assert_eq!(
            parse("zone_report"),
            Ok(Command::ZoneReport {
                offset: 0,
                count: None,
                queue: 0
            })
        );
        assert_eq!(
            parse("zrp -q 1 512k 4"),
            Ok(Command::ZoneReport {
                offset: 512 << 10,
                count: Some(4),
                queue: 1
            })
        );
        for (line, action) in [
            ("zone_open 1M", ZoneAction::Open),
            ("zo 1M", ZoneAction::Open),
            ("zone_close 1M", ZoneAction::Close),
            ("zc 1M", ZoneAction::Close),
            ("zone_finish 1M", ZoneAction::Finish),
            ("zf 1M", ZoneAction::Finish),
            ("zone_reset 1M", ZoneAction::Reset),
            ("zrs 1M", ZoneAction::Reset),
        ] {
            assert_eq!(
                parse(line),
                Ok(Command::ZoneAction {
                    action,
                    offset: 1 << 20,
                    queue: 0
                }),
                "{line}"
            );
        }
        let all = parse("zone_reset_all -q 2").unwrap();
        assert_eq!(
            all,
            Command::ZoneAction {
                action: ZoneAction::ResetAll,
                offset: 0,
                queue: 2
            }
        );
        assert_eq!(all.name(), "zone_reset_all");
        assert!(all.is_zone());
        let zap = parse("zap -P 0x5a 0 8k").unwrap();
        assert_eq!(
            zap,
            Command::ZoneAppend {
                offset: 0,
                len: 8192,
                pattern: 0x5a,
                queue: 0
            }
        );
        assert_eq!(zap.name(), "zone_append");
        assert_eq!(zap.data_len(), 8192);
        assert_eq!(parse("zone_append 0 4k").unwrap().name(), "zone_append");
        assert!(!parse("read 0 4k").unwrap().is_zone());
    }

    #[test]
    fn rejects_bad_zone_commands() {
        assert!(matches!(
            parse("zone_open"),
            Err(ParseError::MissingArgument { what: "OFF", .. })
        ));
        assert!(matches!(
            parse("zone_reset 0 1M"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("zone_reset_all 0"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("zone_report 0 0"),
            Err(ParseError::Zero { what: "COUNT", .. })
        ));
        assert!(matches!(
            parse("zone_report 0 8g"),
            Err(ParseError::BadNumber { what: "count", .. })
        ));
        assert!(matches!(
            parse("zone_report 0 1 2"),
            Err(ParseError::ExtraArgument { .. })
        ));
        assert!(matches!(
            parse("zone_append 0"),
            Err(ParseError::MissingArgument { what: "LEN", .. })
        ));
        assert!(matches!(
            parse("zone_open -P 1 0"),
            Err(ParseError::UnknownOption { .. })
        ));
    }

    #[test]
    fn rejects_offset_overflow() {
        assert!(matches!(
            parse("read 0xffffffffffffffff 4k"),
            Err(ParseError::Overflow { .. })
        ));
        assert!(matches!(
            parse("writev 0xfffffffffffff000 4k 4k"),
            Err(ParseError::Overflow { .. })
        ));
    }
}
