//! What reconciling did, and its lines in the log.

/// What reconciling did, for the log.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Summary {
    pub added_nodes: Vec<String>,
    /// Node and what changed.
    pub updated_nodes: Vec<(String, Vec<String>)>,
    /// Node, old and new size.
    pub resized_nodes: Vec<(String, u64, u64)>,
    pub unchanged_nodes: Vec<String>,
    pub unchanged_exports: Vec<String>,
    /// In the state, not in the file, kept: (name, came from a configuration file).
    pub kept_nodes: Vec<(String, bool)>,
    pub kept_exports: Vec<(String, bool)>,
    pub pruned_nodes: Vec<String>,
    pub pruned_exports: Vec<String>,
    /// Files created: (node, path, size).
    pub created: Vec<(String, String, u64)>,
    /// Exports whose generation was bumped.
    pub bumped: Vec<String>,
}

impl Summary {
    /// Logs what reconciling did.
    pub(crate) fn log(&self, file: &str) {
        for (node, path, size) in &self.created {
            tracing::info!(config = file, %node, %path, size, "created a sparse image");
        }
        for node in &self.pruned_exports {
            tracing::info!(config = file, export = %node, "export removed: not in the configuration (--config-prune)");
        }
        for node in &self.pruned_nodes {
            tracing::info!(config = file, %node, "node removed: not in the configuration (--config-prune)");
        }
        for node in &self.added_nodes {
            tracing::info!(config = file, %node, "node added from the configuration");
        }
        for (node, changes) in &self.updated_nodes {
            tracing::info!(config = file, %node, ?changes, "node updated from the configuration");
        }
        for (node, old, new) in &self.resized_nodes {
            tracing::info!(config = file, %node, old, new, "node resized from the configuration");
        }
        if !self.bumped.is_empty() {
            tracing::info!(config = file, exports = ?self.bumped, "exports reopen live when their frontend reconnects");
        }
        for (name, managed) in &self.kept_nodes {
            if *managed {
                tracing::warn!(config = file, node = %name, "node came from a configuration file but is not in this one; kept (remove it with blkmeshctl, or start with --config-prune)");
            } else {
                tracing::info!(config = file, node = %name, "node added through the API is not in the configuration; kept (--config-prune removes it)");
            }
        }
        for (name, managed) in &self.kept_exports {
            if *managed {
                tracing::warn!(config = file, export = %name, "export came from a configuration file but is not in this one; kept (remove it with blkmeshctl, or start with --config-prune)");
            } else {
                tracing::info!(config = file, export = %name, "export added through the API is not in the configuration; kept (--config-prune removes it)");
            }
        }
        tracing::info!(
            config = file,
            added = self.added_nodes.len(),
            updated = self.updated_nodes.len() + self.resized_nodes.len(),
            unchanged_nodes = self.unchanged_nodes.len(),
            unchanged_exports = self.unchanged_exports.len(),
            kept = self.kept_nodes.len() + self.kept_exports.len(),
            pruned = self.pruned_nodes.len() + self.pruned_exports.len(),
            "configuration applied"
        );
    }
}
