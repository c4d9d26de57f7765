//! The declarative configuration file: nodes and exports in TOML, applied
//! by the manager at start (`--config`) and reconciled with its persisted
//! state (`reconcile.rs`).
//!
//! ```toml
//! [[node]]
//! name = "disk0"
//! io_uring = { path = "/var/lib/blkmesh/images/disk0.img", direct = false }
//! create = { size = "1G" }          # a sparse file, when it is missing
//!
//! [[node]]
//! name = "slow"
//! throttle = { child = "disk0", iops = 5000, bps = "200M", group = "tenant1" }
//!
//! [[export]]
//! id = "disk0"
//! node = "slow"
//! socket = "/run/blkmesh/disk0.sock"
//! writable = true
//! num_queues = 2
//! ```
//!
//! `deploy/config/blkmesh.toml` documents every key. Field names follow the
//! API (`proto/proto/blkmesh/v1/*.proto`), with the CLI's friendly forms:
//! sizes as `"1G"` or integers ([`crate::size`]), durations with a unit,
//! throttle limits as blkmeshctl's `iops`/`bps_read_burst`/..., fault rules
//! as blkmeshctl's `--rule` text or as a table of the same keys
//! ([`crate::rule`]).
//!
//! Every error names the file, the line and column, and the field as a path
//! in the file (`node[2].throttle.iops`, 0-based indices): syntax errors
//! from the TOML parser, type and key errors from this module, and the
//! API's own validation run by [`check`] (and by the manager at start),
//! whose field names (`node.throttle.limits.iops_total.rate`) are mapped to
//! the file's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;
use std::path::Path;

use blkmesh_graph::GraphError;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoUringOptions, NodeSpec, NullOptions,
    NvmeIoUringOptions, RawOptions, ThrottleLimits, ThrottleOptions, VhostUserBlkExport,
    VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions, ZonedOptions,
};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::core::error::ApiError;
use crate::rule::{parse_duration_ns, parse_rule, RuleBuilder, RULE_KEYS};
use crate::size::parse_size;

/// Largest configuration file read, in bytes.
pub const MAX_CONFIG_LEN: u64 = 16 << 20;

/// The driver keys of a node, as in `NodeSpec.driver`.
const DRIVERS: [&str; 9] = [
    "io_uring",
    "null",
    "nvme_io_uring",
    "virtio_blk_vhost_user",
    "virtio_blk_vhost_vdpa",
    "raw",
    "zoned",
    "throttle",
    "fault_injection",
];

/// Throttle keys: (key, bucket in `ThrottleLimits`, is a burst, counts bytes).
const THROTTLE_KEYS: [(&str, &str, bool, bool); 12] = [
    ("iops", "iops_total", false, false),
    ("iops_burst", "iops_total", true, false),
    ("iops_read", "iops_read", false, false),
    ("iops_read_burst", "iops_read", true, false),
    ("iops_write", "iops_write", false, false),
    ("iops_write_burst", "iops_write", true, false),
    ("bps", "bps_total", false, true),
    ("bps_burst", "bps_total", true, true),
    ("bps_read", "bps_read", false, true),
    ("bps_read_burst", "bps_read", true, true),
    ("bps_write", "bps_write", false, true),
    ("bps_write_burst", "bps_write", true, true),
];

/// A problem in a configuration file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given.
    pub file: String,
    /// 1-based line and column (characters), when the problem has a place.
    pub position: Option<(usize, usize)>,
    /// The field as a path in the file, e.g. `node[2].throttle.iops` (empty:
    /// the file as a whole).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some((line, col)) = self.position {
            write!(f, ":{line}:{col}")?;
        }
        if self.field.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in a configuration file, in file order; displayed
/// one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Where an object of the file is and where its keys are.
#[derive(Debug, Clone, Default)]
pub(crate) struct Located {
    /// `node[2]` or `export[0]`.
    pub path: String,
    /// The object's table.
    pub span: Range<usize>,
    /// Each key's value (and each item of a list), by path relative to the
    /// object: `name`, `throttle`, `throttle.iops`,
    /// `fault_injection.rules[1].errno`.
    pub keys: BTreeMap<String, Range<usize>>,
}

impl Located {
    /// The span of `rel` (a path relative to the object), or of its nearest
    /// ancestor given in the file.
    fn span_of(&self, rel: &str) -> Range<usize> {
        let mut cur = rel;
        loop {
            if cur.is_empty() {
                return self.span.clone();
            }
            if let Some(span) = self.keys.get(cur) {
                return span.clone();
            }
            cur = match cur.rfind(['.', '[']) {
                Some(i) => &cur[..i],
                None => "",
            };
        }
    }

    /// The absolute path of `rel`.
    fn path_of(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.path.clone()
        } else {
            format!("{}.{rel}", self.path)
        }
    }
}

/// A node of the file.
#[derive(Debug, Clone)]
pub struct ConfigNode {
    /// The node as the API takes it.
    pub spec: NodeSpec,
    /// `create.size`: an io_uring node's file is created (sparse) with this
    /// size when it does not exist.
    pub create: Option<u64>,
    pub(crate) at: Located,
}

/// An export of the file.
#[derive(Debug, Clone)]
pub struct ConfigExport {
    /// The export as written (not normalized: 0 means the default).
    pub export: VhostUserBlkExport,
    pub(crate) at: Located,
}

/// A parsed configuration file (types and keys checked; [`check`] also runs
/// the API's validation).
#[derive(Debug, Clone)]
pub struct Config {
    file: String,
    text: String,
    nodes: Vec<ConfigNode>,
    exports: Vec<ConfigExport>,
}

impl Config {
    /// The file, as given.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The nodes, in file order.
    pub fn nodes(&self) -> &[ConfigNode] {
        &self.nodes
    }

    /// The exports, in file order.
    pub fn exports(&self) -> &[ConfigExport] {
        &self.exports
    }

    /// An error at `span` about `field`.
    pub(crate) fn error_at(
        &self,
        span: Range<usize>,
        field: String,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            position: Some(position(&self.text, span.start)),
            field,
            message: message.into(),
        }
    }

    /// An error about `rel` (a path relative to the object at `at`).
    pub(crate) fn error_in(
        &self,
        at: &Located,
        rel: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error_at(at.span_of(rel), at.path_of(rel), message)
    }

    /// The 1-based line of `at`'s object.
    pub(crate) fn line_of(&self, at: &Located) -> usize {
        position(&self.text, at.span.start).0
    }

    /// A rejected node, located at the field the API names.
    pub(crate) fn node_error(&self, node: &ConfigNode, e: &ApiError) -> ConfigError {
        let (api_field, problem) = split_api_error(e);
        let rel = node_field(&node.spec, &api_field);
        self.error_in(&node.at, &rel, problem)
    }

    /// A rejected export, located at the field the API names.
    pub(crate) fn export_error(&self, export: &ConfigExport, e: &ApiError) -> ConfigError {
        let (api_field, problem) = split_api_error(e);
        let rel = export_field(&api_field);
        self.error_in(&export.at, &rel, problem)
    }
}

/// 1-based (line, column) of byte offset `at` in `text`; the column counts
/// characters.
fn position(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

/// Reads and parses the file at `path` (types and keys; see [`check`]).
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    use std::io::Read;
    let file = path.display().to_string();
    let whole = |message: String| {
        ConfigErrors(vec![ConfigError {
            file: file.clone(),
            position: None,
            field: String::new(),
            message,
        }])
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_LEN + 1).read_to_end(&mut bytes))
        .map_err(|e| whole(format!("cannot read the configuration file: {e}")))?;
    if bytes.len() as u64 > MAX_CONFIG_LEN {
        return Err(whole(format!(
            "the configuration file is larger than {MAX_CONFIG_LEN} bytes"
        )));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        whole(format!(
            "not valid UTF-8 (at byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    parse(&file, &text)
}

/// Parses configuration text; `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let mut p = Parser {
        file,
        text,
        errors: Vec::new(),
        keys: BTreeMap::new(),
        obj: String::new(),
    };
    let doc = match DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            p.err(
                span,
                String::new(),
                format!("invalid TOML: {}", e.message()),
            );
            return Err(ConfigErrors(p.errors));
        }
    };
    let mut nodes = Vec::new();
    let mut exports = Vec::new();
    let mut top = Tbl::new(doc.get_ref(), doc.span(), "");
    for key in ["node", "export"] {
        top.used.push(key.to_string());
        let Some(v) = doc.get_ref().get(key) else {
            continue;
        };
        let Some(items) = v.get_ref().as_array() else {
            let (msg, span) = (
                format!(
                    "expected an array of tables ([[{key}]] sections), got {}",
                    a_type(v.get_ref())
                ),
                v.span(),
            );
            p.err(span, key.to_string(), msg);
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            let path = format!("{key}[{i}]");
            let Some(table) = item.get_ref().as_table() else {
                let msg = format!("expected a table, got {}", a_type(item.get_ref()));
                p.err(item.span(), path, msg);
                continue;
            };
            p.obj = path.clone();
            p.keys.clear();
            let errors_before = p.errors.len();
            let t = Tbl::new(table, item.span(), "");
            if key == "node" {
                let parsed = p.node(t);
                let at = p.located(item.span());
                if let (Some((spec, create)), true) = (parsed, p.errors.len() == errors_before) {
                    nodes.push(ConfigNode { spec, create, at });
                }
            } else {
                let parsed = p.export(t);
                let at = p.located(item.span());
                if let (Some(export), true) = (parsed, p.errors.len() == errors_before) {
                    exports.push(ConfigExport { export, at });
                }
            }
        }
    }
    p.obj.clear();
    p.unknown_keys(&top, "top-level key", &["node", "export"]);
    if !p.errors.is_empty() {
        return Err(ConfigErrors(p.errors));
    }
    Ok(Config {
        file: file.to_string(),
        text: text.to_string(),
        nodes,
        exports,
    })
}

/// Reads and parses the file at `path` and runs the API's validation on it
/// as a whole: every node and export as AddNode and AddExport would check
/// it against an empty manager (names, children, sizes, throttle groups,
/// zoned rules, duplicate names and sockets), without touching the
/// filesystem. What the manager checks at start besides: the paths (files,
/// devices, sockets) and the objects it already has.
pub fn check(path: &Path) -> Result<Config, ConfigErrors> {
    let config = load(path)?;
    crate::reconcile::validate(&config)?;
    Ok(config)
}

/// Like [`check`], for text.
pub fn check_str(file: &str, text: &str) -> Result<Config, ConfigErrors> {
    let config = parse(file, text)?;
    crate::reconcile::validate(&config)?;
    Ok(config)
}

/// A table being read, with the keys taken from it so far.
struct Tbl<'t, 'i> {
    table: &'t DeTable<'i>,
    span: Range<usize>,
    /// Path relative to the object (`""`, `throttle`, `fault_injection.rules[0]`).
    rel: String,
    used: Vec<String>,
}

impl<'t, 'i> Tbl<'t, 'i> {
    fn new(table: &'t DeTable<'i>, span: Range<usize>, rel: &str) -> Self {
        Tbl {
            table,
            span,
            rel: rel.to_string(),
            used: Vec::new(),
        }
    }

    fn rel(&self, key: &str) -> String {
        join(&self.rel, key)
    }
}

/// "a string", "an integer", ...: the TOML type of `v` with its article.
fn a_type(v: &DeValue<'_>) -> String {
    let t = v.type_str();
    let article = if t.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    };
    format!("{article} {t}")
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

type Value<'t, 'i> = &'t Spanned<DeValue<'i>>;

struct Parser<'a> {
    file: &'a str,
    text: &'a str,
    errors: Vec<ConfigError>,
    /// Spans of the current object's keys (see [`Located::keys`]).
    keys: BTreeMap<String, Range<usize>>,
    /// Path of the current object (`node[2]`).
    obj: String,
}

impl Parser<'_> {
    fn err(&mut self, span: Range<usize>, field: String, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            position: Some(position(self.text, span.start)),
            field,
            message: message.into(),
        });
    }

    /// The absolute path of `rel` in the current object.
    fn path(&self, rel: &str) -> String {
        match (self.obj.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.obj.clone(),
            (false, false) => format!("{}.{rel}", self.obj),
        }
    }

    fn err_rel(&mut self, span: Range<usize>, rel: &str, message: impl Into<String>) {
        let field = self.path(rel);
        self.err(span, field, message);
    }

    fn located(&mut self, span: Range<usize>) -> Located {
        Located {
            path: self.obj.clone(),
            span,
            keys: std::mem::take(&mut self.keys),
        }
    }

    /// Takes `key` from `t`, recording its span.
    fn field<'t, 'i>(&mut self, t: &mut Tbl<'t, 'i>, key: &str) -> Option<Value<'t, 'i>> {
        t.used.push(key.to_string());
        let v = t.table.get(key)?;
        self.keys.insert(t.rel(key), v.span());
        Some(v)
    }

    fn wrong_type(&mut self, v: Value<'_, '_>, rel: &str, expected: &str) {
        let got = a_type(v.get_ref());
        self.err_rel(v.span(), rel, format!("expected {expected}, got {got}"));
    }

    /// Errors for the keys of `t` not taken.
    fn unknown_keys(&mut self, t: &Tbl<'_, '_>, what: &str, allowed: &[&str]) {
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

    fn table<'t, 'i>(&mut self, t: &mut Tbl<'t, 'i>, key: &str) -> Option<Tbl<'t, 'i>> {
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

    fn string(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<String> {
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
    fn required_string(&mut self, t: &mut Tbl<'_, '_>, key: &str, what: &str) -> Option<String> {
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

    fn bool(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<bool> {
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
    fn uint(&mut self, t: &mut Tbl<'_, '_>, key: &str, max: u64) -> Option<u64> {
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

    fn u32(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u32> {
        self.uint(t, key, u64::from(u32::MAX))
            .and_then(|n| u32::try_from(n).ok())
    }

    /// A size: an integer (bytes) or a string with a k/M/G/T suffix.
    fn size(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u64> {
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

    fn size_u32(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u32> {
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
    fn duration(&mut self, t: &mut Tbl<'_, '_>, key: &str) -> Option<u64> {
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

    fn node(&mut self, mut t: Tbl<'_, '_>) -> Option<(NodeSpec, Option<u64>)> {
        let name = self.required_string(&mut t, "name", "the node's name");
        let present: Vec<&str> = DRIVERS
            .iter()
            .copied()
            .filter(|d| t.table.contains_key(*d))
            .collect();
        let mut driver = None;
        let mut kind = "";
        match present.as_slice() {
            [] => {
                let msg = format!("no driver: give one of {}", DRIVERS.join(", "));
                let span = t.span.clone();
                self.err_rel(span, "", msg);
            }
            [one] => {
                kind = one;
                driver = self.driver(&mut t, one);
            }
            [first, rest @ ..] => {
                for other in rest {
                    t.used.push((*other).to_string());
                    let span = t
                        .table
                        .get(*other)
                        .map(|v| v.span())
                        .unwrap_or(t.span.clone());
                    let msg = format!("a node has one driver (it has {first} already)");
                    self.err_rel(span, other, msg);
                }
                t.used.push((*first).to_string());
            }
        }
        let mut create = None;
        if let Some(mut c) = self.table(&mut t, "create") {
            let size = self.size(&mut c, "size");
            match size {
                None if !c.table.contains_key("size") => {
                    let span = c.span.clone();
                    self.err_rel(
                        span,
                        "create.size",
                        "missing: the size of the file to create, e.g. \"1G\"",
                    );
                }
                Some(n) if n == 0 || n % blkmesh_graph::SECTOR_SIZE != 0 => {
                    let span = c
                        .table
                        .get("size")
                        .map(|v| v.span())
                        .unwrap_or(c.span.clone());
                    self.err_rel(
                        span,
                        "create.size",
                        format!("must be a non-zero multiple of 512 (got {n})"),
                    );
                }
                Some(n) => create = Some(n),
                None => {}
            }
            self.unknown_keys(&c, "key", &["size"]);
            if !kind.is_empty() && kind != "io_uring" {
                let span = c.span.clone();
                self.err_rel(
                    span,
                    "create",
                    format!("only io_uring nodes have a file to create (this is a {kind} node)"),
                );
            }
        }
        let mut allowed = vec!["name", "create"];
        allowed.extend(DRIVERS);
        self.unknown_keys(&t, "key", &allowed);
        Some((
            NodeSpec {
                name: name?,
                driver: Some(driver?),
            },
            create,
        ))
    }

    fn driver(&mut self, node: &mut Tbl<'_, '_>, kind: &str) -> Option<Driver> {
        let mut t = self.table(node, kind)?;
        let path_what = "an absolute path";
        let (driver, allowed): (Option<Driver>, &[&str]) = match kind {
            "io_uring" => {
                let path = self.required_string(
                    &mut t,
                    "path",
                    "the absolute path of a file or block device",
                );
                let direct = self.bool(&mut t, "direct").unwrap_or(false);
                let read_only = self.bool(&mut t, "read_only").unwrap_or(false);
                (
                    path.map(|path| {
                        Driver::IoUring(IoUringOptions {
                            path,
                            direct,
                            read_only,
                        })
                    }),
                    &["path", "direct", "read_only"],
                )
            }
            "null" => {
                let size = self.size(&mut t, "size");
                if size.is_none() && !t.table.contains_key("size") {
                    let span = t.span.clone();
                    self.err_rel(span, "null.size", "missing: the size in bytes, e.g. \"1G\"");
                }
                let latency_ns = self.duration(&mut t, "latency").unwrap_or(0);
                (
                    size.map(|size| Driver::Null(NullOptions { size, latency_ns })),
                    &["size", "latency"],
                )
            }
            "nvme_io_uring" | "virtio_blk_vhost_user" | "virtio_blk_vhost_vdpa" => {
                let path = self.required_string(&mut t, "path", path_what);
                let read_only = self.bool(&mut t, "read_only").unwrap_or(false);
                (
                    path.map(|path| match kind {
                        "nvme_io_uring" => {
                            Driver::NvmeIoUring(NvmeIoUringOptions { path, read_only })
                        }
                        "virtio_blk_vhost_user" => {
                            Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
                                path,
                                read_only,
                            })
                        }
                        _ => Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
                            path,
                            read_only,
                        }),
                    }),
                    &["path", "read_only"],
                )
            }
            "raw" => {
                let child = self.required_string(&mut t, "child", "the name of the child node");
                let offset = self.size(&mut t, "offset").unwrap_or(0);
                let size = self.size(&mut t, "size").unwrap_or(0);
                (
                    child.map(|child| {
                        Driver::Raw(RawOptions {
                            child,
                            offset,
                            size,
                        })
                    }),
                    &["child", "offset", "size"],
                )
            }
            "zoned" => {
                let child = self.required_string(&mut t, "child", "the name of the child node");
                let zone_size = self.size(&mut t, "zone_size");
                if zone_size.is_none() && !t.table.contains_key("zone_size") {
                    let span = t.span.clone();
                    self.err_rel(
                        span,
                        "zoned.zone_size",
                        "missing: the zone size, e.g. \"256M\"",
                    );
                }
                let zone_capacity = self.size(&mut t, "zone_capacity").unwrap_or(0);
                let max_open_zones = self.u32(&mut t, "max_open_zones").unwrap_or(0);
                let max_active_zones = self.u32(&mut t, "max_active_zones").unwrap_or(0);
                let metadata_path = self.required_string(
                    &mut t,
                    "metadata_path",
                    "the absolute path of the zone metadata file",
                );
                (
                    child.zip(zone_size).zip(metadata_path).map(
                        |((child, zone_size), metadata_path)| {
                            Driver::Zoned(ZonedOptions {
                                child,
                                zone_size,
                                zone_capacity,
                                max_open_zones,
                                max_active_zones,
                                metadata_path,
                            })
                        },
                    ),
                    &[
                        "child",
                        "zone_size",
                        "zone_capacity",
                        "max_open_zones",
                        "max_active_zones",
                        "metadata_path",
                    ],
                )
            }
            "throttle" => {
                let child = self.required_string(&mut t, "child", "the name of the child node");
                let group = self.string(&mut t, "group").unwrap_or_default();
                let mut limits = ThrottleLimits::default();
                for (key, bucket, burst, bytes) in THROTTLE_KEYS {
                    let value = if bytes {
                        self.size(&mut t, key)
                    } else {
                        self.uint(&mut t, key, u64::MAX)
                    };
                    let Some(value) = value else {
                        continue;
                    };
                    let slot = match bucket {
                        "iops_total" => &mut limits.iops_total,
                        "iops_read" => &mut limits.iops_read,
                        "iops_write" => &mut limits.iops_write,
                        "bps_total" => &mut limits.bps_total,
                        "bps_read" => &mut limits.bps_read,
                        _ => &mut limits.bps_write,
                    };
                    let b = slot.get_or_insert(Bucket::default());
                    if burst {
                        b.burst = value;
                    } else {
                        b.rate = value;
                    }
                }
                const KEYS: [&str; 14] = [
                    "child",
                    "group",
                    "iops",
                    "iops_burst",
                    "iops_read",
                    "iops_read_burst",
                    "iops_write",
                    "iops_write_burst",
                    "bps",
                    "bps_burst",
                    "bps_read",
                    "bps_read_burst",
                    "bps_write",
                    "bps_write_burst",
                ];
                (
                    child.map(|child| {
                        Driver::Throttle(ThrottleOptions {
                            child,
                            limits: Some(limits),
                            group,
                        })
                    }),
                    &KEYS,
                )
            }
            _ => {
                // fault_injection
                let child = self.required_string(&mut t, "child", "the name of the child node");
                let rules = self.rules(&mut t);
                let max_transfer = self.size(&mut t, "max_transfer").unwrap_or(0);
                let max_segments = self.u32(&mut t, "max_segments").unwrap_or(0);
                let buf_alignment = self.size_u32(&mut t, "buf_alignment").unwrap_or(0);
                (
                    child.zip(rules).map(|(child, rules)| {
                        Driver::FaultInjection(FaultInjectionOptions {
                            child,
                            rules,
                            max_transfer,
                            max_segments,
                            buf_alignment,
                        })
                    }),
                    &[
                        "child",
                        "rules",
                        "max_transfer",
                        "max_segments",
                        "buf_alignment",
                    ],
                )
            }
        };
        self.unknown_keys(&t, "key", allowed);
        driver
    }

    /// `rules`: a list of rules, each blkmeshctl's `--rule` text or a table
    /// of the same keys. Absent: no rules.
    fn rules(&mut self, t: &mut Tbl<'_, '_>) -> Option<Vec<FaultRule>> {
        let Some(v) = self.field(t, "rules") else {
            return Some(Vec::new());
        };
        let rel = t.rel("rules");
        let Some(items) = v.get_ref().as_array() else {
            self.wrong_type(v, &rel, "a list of rules");
            return None;
        };
        let mut rules = Vec::new();
        let mut ok = true;
        for (i, item) in items.iter().enumerate() {
            let item_rel = format!("{rel}[{i}]");
            self.keys.insert(item_rel.clone(), item.span());
            if let Some(text) = item.get_ref().as_str() {
                match parse_rule(text) {
                    Ok(r) => rules.push(r),
                    Err(e) => {
                        self.err_rel(item.span(), &item_rel, e);
                        ok = false;
                    }
                }
                continue;
            }
            let Some(table) = item.get_ref().as_table() else {
                self.wrong_type(
                    item,
                    &item_rel,
                    "a rule (a string such as \"ops=read,errno=EIO\", or a table)",
                );
                ok = false;
                continue;
            };
            let mut entries: Vec<_> = table.iter().collect();
            entries.sort_by_key(|(k, _)| k.span().start);
            let mut builder = RuleBuilder::default();
            let mut rule_ok = true;
            for (k, v) in entries {
                let key = k.get_ref().as_ref();
                let key_rel = format!("{item_rel}.{key}");
                if !RULE_KEYS.contains(&key) {
                    let msg = format!(
                        "unknown key {key:?} (expected one of: {})",
                        RULE_KEYS.join(", ")
                    );
                    self.err_rel(k.span(), &key_rel, msg);
                    rule_ok = false;
                    continue;
                }
                self.keys.insert(key_rel.clone(), v.span());
                let text = match v.get_ref() {
                    DeValue::String(s) => s.to_string(),
                    DeValue::Integer(n) => match i128::from_str_radix(n.as_str(), n.radix()) {
                        Ok(n) => n.to_string(),
                        Err(_) => n.as_str().to_string(),
                    },
                    DeValue::Float(f) => f.as_str().to_string(),
                    other => {
                        let msg = format!("expected a string or a number, got {}", a_type(other));
                        self.err_rel(v.span(), &key_rel, msg);
                        rule_ok = false;
                        continue;
                    }
                };
                if let Err(e) = builder.set(key, &text) {
                    self.err_rel(v.span(), &key_rel, e);
                    rule_ok = false;
                }
            }
            if !rule_ok {
                ok = false;
                continue;
            }
            match builder.finish() {
                Ok(r) => rules.push(r),
                Err(e) => {
                    self.err_rel(item.span(), &item_rel, e);
                    ok = false;
                }
            }
        }
        ok.then_some(rules)
    }

    fn export(&mut self, mut t: Tbl<'_, '_>) -> Option<VhostUserBlkExport> {
        let id = self.required_string(&mut t, "id", "the export's id");
        let node = self.required_string(&mut t, "node", "the name of the exported node");
        let socket = self.required_string(
            &mut t,
            "socket",
            "the absolute path of the vhost-user socket",
        );
        let num_queues = self.u32(&mut t, "num_queues").unwrap_or(0);
        let queue_size = self.u32(&mut t, "queue_size").unwrap_or(0);
        let logical_block_size = self.u32(&mut t, "logical_block_size").unwrap_or(0);
        let writable = self.bool(&mut t, "writable").unwrap_or(false);
        let serial = self.string(&mut t, "serial").unwrap_or_default();
        let spread_queues = self.bool(&mut t, "spread_queues").unwrap_or(false);
        self.unknown_keys(
            &t,
            "key",
            &[
                "id",
                "node",
                "socket",
                "num_queues",
                "queue_size",
                "logical_block_size",
                "writable",
                "serial",
                "spread_queues",
            ],
        );
        Some(VhostUserBlkExport {
            id: id?,
            node: node?,
            socket: socket?,
            num_queues,
            queue_size,
            logical_block_size,
            writable,
            serial,
            spread_queues,
        })
    }
}

// ----- API field names -> paths in the file -----

/// The API field an error is about (`""`: none) and the problem without it.
pub(crate) fn split_api_error(e: &ApiError) -> (String, String) {
    match e {
        ApiError::Graph(g) => graph_error_parts(g),
        ApiError::Missing(f) => ((*f).to_string(), "must be set".to_string()),
        ApiError::Invalid { field, problem } => (field.clone(), problem.clone()),
        other => (String::new(), other.to_string()),
    }
}

fn graph_error_parts(g: &GraphError) -> (String, String) {
    match g {
        GraphError::InvalidField { field, problem }
        | GraphError::Duplicate { field, problem }
        | GraphError::Precondition { field, problem } => ((*field).to_string(), problem.clone()),
        GraphError::InvalidItem {
            list,
            index,
            field,
            problem,
        } => (format!("{list}[{index}].{field}"), problem.clone()),
        GraphError::NotFound { field, kind, name } => {
            ((*field).to_string(), format!("{kind} {name:?} not found"))
        }
        GraphError::AlreadyExists { field, kind, name } => (
            (*field).to_string(),
            format!("{kind} {name:?} already exists"),
        ),
        GraphError::ChildTaken {
            field,
            child,
            parent,
        } => (
            (*field).to_string(),
            format!("node {child:?} is already the child of node {parent:?}"),
        ),
        GraphError::Cycle { field, path } => (
            (*field).to_string(),
            format!("nodes form a cycle: {}", path.join(" -> ")),
        ),
        GraphError::InUse { .. } => (String::new(), g.to_string()),
    }
}

/// The path in a node's table of an API field (`node.throttle.limits.iops_total.burst`
/// → `throttle.iops_burst`); `""` is the node's table.
pub(crate) fn node_field(spec: &NodeSpec, api: &str) -> String {
    let driver = blkmesh_graph::driver_name(spec);
    match api {
        "node.name" | "name" => return "name".into(),
        "" | "node" | "node.driver" => return String::new(),
        "size" => {
            return match driver {
                "null" | "raw" => format!("{driver}.size"),
                _ => String::new(),
            }
        }
        _ => {}
    }
    let Some(rest) = api.strip_prefix("node.") else {
        return String::new();
    };
    if rest == "null.latency_ns" {
        return "null.latency".into();
    }
    if rest == "throttle.limits" {
        return "throttle".into();
    }
    if let Some(bucket) = rest.strip_prefix("throttle.limits.") {
        let (bucket, part) = bucket.split_once('.').unwrap_or((bucket, "rate"));
        let burst = part == "burst";
        if let Some((key, ..)) = THROTTLE_KEYS
            .iter()
            .find(|(_, b, is_burst, _)| *b == bucket && *is_burst == burst)
        {
            return format!("throttle.{key}");
        }
        return "throttle".into();
    }
    if let Some(item) = rest.strip_prefix("fault_injection.rules[") {
        // `fault_injection.rules[I].FIELD`
        if let Some((index, field)) = item.split_once("].") {
            let key = match field {
                "offset_start" => "start",
                "offset_end" => "end",
                "probability" => "prob",
                "delay_ns" => "delay",
                "action" => "",
                other => other,
            };
            return if key.is_empty() {
                format!("fault_injection.rules[{index}]")
            } else {
                format!("fault_injection.rules[{index}].{key}")
            };
        }
    }
    rest.to_string()
}

/// The path in an export's table of an API field (`export.num_queues` →
/// `num_queues`); `""` is the export's table.
pub(crate) fn export_field(api: &str) -> String {
    match api.strip_prefix("export.") {
        Some(rest) => rest.to_string(),
        None if api == "id" => "id".into(),
        None => String::new(),
    }
}

/// The names of the config's nodes and ids of its exports.
pub(crate) fn names(config: &Config) -> (BTreeSet<String>, BTreeSet<String>) {
    (
        config.nodes.iter().map(|n| n.spec.name.clone()).collect(),
        config.exports.iter().map(|e| e.export.id.clone()).collect(),
    )
}

#[cfg(test)]
mod tests;
