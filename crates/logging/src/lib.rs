//! Log setup shared by the blkmesh daemons.
//!
//! Logs go to stderr as structured `tracing` events, filtered by
//! `RUST_LOG` (default `info`). `BLKMESH_LOG_FORMAT=json` writes one JSON
//! object per line (timestamp, level, target, fields, span) for log
//! collectors; anything else, or nothing, gives human-readable text, with
//! colours only on a terminal.

#![forbid(unsafe_code)]

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// The environment variable that selects the log format.
pub const FORMAT_ENV: &str = "BLKMESH_LOG_FORMAT";

/// Log line format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

impl Format {
    /// The format `BLKMESH_LOG_FORMAT` asks for.
    pub fn from_env() -> Format {
        Self::parse(std::env::var(FORMAT_ENV).ok().as_deref())
    }

    fn parse(v: Option<&str>) -> Format {
        match v.map(str::trim) {
            Some(v) if v.eq_ignore_ascii_case("json") => Format::Json,
            _ => Format::Text,
        }
    }
}

/// Installs the global subscriber. `show_target`: include the event's
/// module path in text lines.
pub fn init(show_target: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    init_with_filter(filter, show_target);
}

/// As [`init`], with a filter the caller built (e.g. from a `--log` flag).
pub fn init_with_filter(filter: EnvFilter, show_target: bool) {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match Format::from_env() {
        Format::Json => builder.json().with_current_span(true).init(),
        Format::Text => builder
            .with_target(show_target)
            .with_ansi(std::io::stderr().is_terminal())
            .init(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_only_when_asked() {
        assert_eq!(Format::parse(Some("json")), Format::Json);
        assert_eq!(Format::parse(Some(" JSON ")), Format::Json);
        assert_eq!(Format::parse(Some("text")), Format::Text);
        assert_eq!(Format::parse(Some("")), Format::Text);
        assert_eq!(Format::parse(None), Format::Text);
    }
}
