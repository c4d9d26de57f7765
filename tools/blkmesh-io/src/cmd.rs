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
//! ```
//!
//! Sizes and offsets are plain bytes or take a k/K, m/M, g/G, t/T suffix
//! (powers of 1024). Patterns are bytes, decimal or `0x` hex.

use thiserror::Error;

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
        }
    }

    /// The queue the command runs on (`info` uses none; reported as 0).
    pub fn queue(&self) -> usize {
        match self {
            Command::Read { queue, .. }
            | Command::Write { queue, .. }
            | Command::Flush { queue }
            | Command::Discard { queue, .. }
            | Command::WriteZeroes { queue, .. } => *queue,
            Command::Info => 0,
        }
    }

    /// Data bytes moved through I/O buffers (0 for commands without data).
    pub fn data_len(&self) -> u64 {
        match self {
            Command::Read { lens, .. } | Command::Write { lens, .. } => lens.iter().sum(),
            Command::Flush { .. }
            | Command::Discard { .. }
            | Command::WriteZeroes { .. }
            | Command::Info => 0,
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
    usage: &'static str,
    pattern: bool,
    unmap: bool,
    queue: bool,
}

const SPECS: &[Spec] = &[
    Spec {
        name: "read",
        usage: "read [-P pattern] [-q queue] OFF LEN",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "write",
        usage: "write [-P pattern] [-q queue] OFF LEN",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "readv",
        usage: "readv [-P pattern] [-q queue] OFF LEN [LEN ...]",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "writev",
        usage: "writev [-P pattern] [-q queue] OFF LEN [LEN ...]",
        pattern: true,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "flush",
        usage: "flush [-q queue]",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "discard",
        usage: "discard [-q queue] OFF LEN",
        pattern: false,
        unmap: false,
        queue: true,
    },
    Spec {
        name: "write_zeroes",
        usage: "write_zeroes [-u] [-q queue] OFF LEN",
        pattern: false,
        unmap: true,
        queue: true,
    },
    Spec {
        name: "info",
        usage: "info",
        pattern: false,
        unmap: false,
        queue: false,
    },
];

/// Parses one `-c` command line.
pub fn parse(line: &str) -> Result<Command, ParseError> {
    let mut words = line.split_whitespace();
    let name = words.next().ok_or(ParseError::Empty)?;
    let spec = SPECS
        .iter()
        .find(|s| s.name == name)
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
