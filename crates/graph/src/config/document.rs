//! What a configuration file holds once read: its nodes and exports, each
//! with where it is in the file, and the errors, each with its line and
//! field.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::ops::Range;

use blkmesh_proto::v1::{NodeSpec, VhostUserBlkExport};

use crate::config::fields::{export_field, node_field, FieldError};

/// Largest configuration file read, in bytes.
pub const MAX_CONFIG_LEN: u64 = 16 << 20;

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
    pub(crate) fn span_of(&self, rel: &str) -> Range<usize> {
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
    pub(crate) fn path_of(&self, rel: &str) -> String {
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

/// A parsed configuration file (types and keys checked; [`crate::config::check`] also runs
/// the API's validation).
#[derive(Debug, Clone)]
pub struct Config {
    pub(crate) file: String,
    pub(crate) text: String,
    pub(crate) nodes: Vec<ConfigNode>,
    pub(crate) exports: Vec<ConfigExport>,
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

    /// An error about `rel` (a path relative to the node's table, `""`:
    /// the table).
    pub fn node_error_at(
        &self,
        node: &ConfigNode,
        rel: &str,
        message: impl Into<String>,
    ) -> ConfigError {
        self.error_in(&node.at, rel, message)
    }

    /// A rejected node, located at the field the API names.
    pub fn node_error(&self, node: &ConfigNode, e: &impl FieldError) -> ConfigError {
        let (api_field, problem) = e.field_and_problem();
        let rel = node_field(&node.spec, &api_field);
        self.error_in(&node.at, &rel, problem)
    }

    /// A rejected export, located at the field the API names.
    pub fn export_error(&self, export: &ConfigExport, e: &impl FieldError) -> ConfigError {
        let (api_field, problem) = e.field_and_problem();
        let rel = export_field(&api_field);
        self.error_in(&export.at, &rel, problem)
    }
}

/// 1-based (line, column) of byte offset `at` in `text`; the column counts
/// characters.
pub(crate) fn position(text: &str, at: usize) -> (usize, usize) {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let before = &text[..at];
    let line = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, before[start..].chars().count() + 1)
}

impl Config {
    /// The names of the file's nodes and the ids of its exports.
    pub fn names(&self) -> (BTreeSet<String>, BTreeSet<String>) {
        (
            self.nodes.iter().map(|n| n.spec.name.clone()).collect(),
            self.exports.iter().map(|e| e.export.id.clone()).collect(),
        )
    }
}
