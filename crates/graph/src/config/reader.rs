//! Reading TOML tables with every error located: the typed getters the
//! parser of nodes and exports is built on.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::rule::parse_duration_ns;
use crate::size::parse_size;

use crate::config::document::{position, ConfigError, Located};

/// A table being read, with the keys taken from it so far.
pub(super) struct Tbl<'t, 'i> {
    pub(super) table: &'t DeTable<'i>,
    pub(super) span: Range<usize>,
    /// Path relative to the object (`""`, `throttle`, `fault_injection.rules[0]`).
    pub(super) rel: String,
    pub(super) used: Vec<String>,
}

impl<'t, 'i> Tbl<'t, 'i> {
    pub(super) fn new(table: &'t DeTable<'i>, span: Range<usize>, rel: &str) -> Self {
        Tbl {
            table,
            span,
            rel: rel.to_string(),
            used: Vec::new(),
        }
    }

    pub(super) fn rel(&self, key: &str) -> String {
        join(&self.rel, key)
    }
}

/// "a string", "an integer", ...: the TOML type of `v` with its article.
pub(super) fn a_type(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

pub(super) fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

pub(super) type Value<'t, 'i> = &'t Spanned<DeValue<'i>>;

pub(super) struct Parser<'a> {
    pub(super) file: &'a str,
    pub(super) text: &'a str,
    pub(super) errors: Vec<ConfigError>,
    /// Spans of the current object's keys (see [`Located::keys`]).
    pub(super) keys: BTreeMap<String, Range<usize>>,
    /// Path of the current object (`node[2]`).
    pub(super) obj: String,
}

impl Parser<'_> {
    pub(super) fn err(&mut self, span: Range<usize>, field: String, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            position: Some(position(self.text, span.start)),
            field,
            message: message.into(),
        });
    }

    /// The absolute path of `rel` in the current object.
    pub(super) fn path(&self, rel: &str) -> String {
        match (self.obj.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.obj.clone(),
            (false, false) => format!("{}.{rel}", self.obj),
        }
    }

    pub(super) fn err_rel(&mut self, span: Range<usize>, rel: &str, message: impl Into<String>) {
        let field = self.path(rel);
        self.err(span, field, message);
    }

    pub(super) fn located(&mut self, span: Range<usize>) -> Located {
        Located {
            path: self.obj.clone(),
            span,
            keys: std::mem::take(&mut self.keys),
        }
    }

    /// Takes `key` from `t`, recording its span.
    pub(super) fn field<'t, 'i>(
        &mut self,
        t: &mut Tbl<'t, 'i>,
        key: &str,
    ) -> Option<Value<'t, 'i>> {
        t.used.push(key.to_string());
        let v = t.table.get(key)?;
        self.keys.insert(t.rel(key), v.span());
        Some(v)
    }

    pub(super) fn wrong_type(&mut self, v: Value<'_, '_>, rel: &str, expected: &str) {
        let got = a_type(v.get_ref());
        self.err_rel(v.span(), rel, format!("expected {expected}, got {got}"));
    }

    /// Errors for the keys of `t` not taken.
    pub(super) fn unknown_keys(&mut self, t: &Tbl<'_, '_>, what: &str, allowed: &[&str]) {
        let mut unknown: Vec<(&Spanned<std::borrow::Cow<'_, str>>, Range<usize>)> = t
            .table
            .iter()
            .filter(|(k, _)| !t.used.iter().any(|u| u == k.get_ref().as_ref()))
            .map(|(k, _)| (k, k.span()))
            .collect();
        unknown.sort_by_key(|(_, span)| span.start);
        for (k, span) in unknown {
            let name = k.get_ref().as_ref();
            let msg = format!(
                "unknown {what} {name:?} (expected one of: {})",
                allowed.join(", ")
            );
            let rel = t.rel(name);
            self.err_rel(span, &rel, msg);
        }
    }

    pub(super) fn table<'t, 'i>(&mut self, t: &mut Tbl<'t, 'i>, key: &str) -> Option<Tbl<'t, 'i>> {
        let v = self.field(t, key)?;
        let rel = t.rel(key);
        match v.get_ref().as_table() {
            Some(table) => Some(Tbl::new(table, v.span(), &rel)),
            None => {
                self.wrong_type(v, &rel, "a table");
                None
            }
        }
    }

    pub(super) fn string(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<String> {
        let v = self.field(t, key)?;
        match v.get_ref().as_str() {
            Some(s) => Some(s.to_string()),
            None => {
                self.wrong_type(v, &t.rel(key), "a string");
                None
            }
        }
    }

    /// A string that must be given.
    pub(super) fn required_string(
        &mut self,
        t: &mut Tbl<'_, '_>,
        key: &str,
        what: &str,
    ) -> Option<String> {
        let before = self.errors.len();
        match self.string(t, key) {
            Some(s) => Some(s),
            None => {
                if self.errors.len() == before {
                    let rel = t.rel(key);
                    self.err_rel(t.span.clone(), &rel, format!("missing: {what}"));
                }
                None
            }
        }
    }

    pub(super) fn bool(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<bool> {
        let v = self.field(t, key)?;
        match v.get_ref().as_bool() {
            Some(b) => Some(b),
            None => {
                self.wrong_type(v, &t.rel(key), "true or false");
                None
            }
        }
    }

    /// A non-negative integer.
    pub(super) fn uint(&mut self, t: &mut Tbl<'_, '_>, key: &str, max: u64) -> Option<u64> {
        let v = self.field(t, key)?;
        let rel = t.rel(key);
        let Some(i) = v.get_ref().as_integer() else {
            self.wrong_type(v, &rel, "an integer");
            return None;
        };
        match i128::from_str_radix(i.as_str(), i.radix()) {
            Ok(n) if n < 0 => {
                self.err_rel(v.span(), &rel, format!("must not be negative (got {n})"));
                None
            }
            Ok(n) if n > i128::from(max) => {
                self.err_rel(v.span(), &rel, format!("must be at most {max} (got {n})"));
                None
            }
            Ok(n) => u64::try_from(n).ok(),
            Err(_) => {
                self.err_rel(
                    v.span(),
                    &rel,
                    format!("integer {} is too large", i.as_str()),
                );
                None
            }
        }
    }

    pub(super) fn u32(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u32> {
        self.uint(t, key, u64::from(u32::MAX))
            .and_then(|n| u32::try_from(n).ok())
    }

    /// A size: an integer (bytes) or a string with a k/M/G/T suffix.
    pub(super) fn size(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u64> {
        let v = t.table.get(key)?;
        if v.get_ref().is_integer() {
            return self.uint(t, key, u64::MAX);
        }
        let v = self.field(t, key)?;
        let rel = t.rel(key);
        match v.get_ref().as_str() {
            Some(s) => match parse_size(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.err_rel(v.span(), &rel, e);
                    None
                }
            },
            None => {
                self.wrong_type(
                    v,
                    &rel,
                    "a size (bytes, or a string such as \"64k\" or \"1G\")",
                );
                None
            }
        }
    }

    pub(super) fn size_u32(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u32> {
        let n = self.size(t, key)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                let span = t.table.get(key).map(|v| v.span()).unwrap_or(t.span.clone());
                let rel = t.rel(key);
                self.err_rel(span, &rel, format!("must be at most 4G - 1 (got {n})"));
                None
            }
        }
    }

    /// A duration with a unit (`"100us"`), in nanoseconds; the integer 0 is
    /// accepted too.
    pub(super) fn duration(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u64> {
        let v = self.field(t, key)?;
        let rel = t.rel(key);
        if let Some(i) = v.get_ref().as_integer() {
            if i.as_str() == "0" {
                return Some(0);
            }
        }
        match v.get_ref().as_str() {
            Some(s) => match parse_duration_ns(s) {
                Ok(n) => Some(n),
                Err(e) => {
                    self.err_rel(v.span(), &rel, e);
                    None
                }
            },
            None => {
                self.wrong_type(
                    v,
                    &rel,
                    "a duration with a unit, such as \"100us\" or \"5ms\"",
                );
                None
            }
        }
    }
}
