//! `config check`: a manager configuration file checked offline.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCmd {
    /// Check a configuration file offline (no manager is contacted): its
    /// syntax, keys and types, and every rule AddNode and AddExport apply to
    /// its nodes and exports as a whole (names, children, sizes, throttle
    /// groups, duplicate ids and sockets...). Paths are not looked at (they
    /// are the paths the manager and workers see), nor is the manager's
    /// state. Prints each problem as FILE:LINE:COLUMN: FIELD: PROBLEM and
    /// exits with status 2 if there is one; deploy/config/blkmesh.toml
    /// documents the format.
    Check {
        /// The file.
        file: std::path::PathBuf,
    },
}

/// `config check`: exit status 0 (valid) or 2 (not), without a manager.
pub(crate) fn config_check(file: &std::path::Path, json: bool) -> ExitCode {
    use std::io::Write;
    let result = blkmesh_graph::config::check(file);
    let mut stdout = std::io::stdout();
    let mut stderr = std::io::stderr();
    match result {
        Ok(config) => {
            let _ = if json {
                let v = serde_json::json!({
                    "file": config.file(),
                    "valid": true,
                    "nodes": config.nodes().iter().map(|n| n.spec.name.as_str()).collect::<Vec<_>>(),
                    "exports": config.exports().iter().map(|e| serde_json::json!({
                        "id": e.export.id,
                        "node": e.export.node,
                        "socket": e.export.socket,
                    })).collect::<Vec<_>>(),
                });
                writeln!(stdout, "{v}")
            } else {
                writeln!(
                    stdout,
                    "{}: valid: {} node{}, {} export{}",
                    config.file(),
                    config.nodes().len(),
                    if config.nodes().len() == 1 { "" } else { "s" },
                    config.exports().len(),
                    if config.exports().len() == 1 { "" } else { "s" },
                )
            };
            ExitCode::SUCCESS
        }
        Err(errors) => {
            if json {
                let v = serde_json::json!({
                    "file": file.display().to_string(),
                    "valid": false,
                    "errors": errors.0.iter().map(|e| serde_json::json!({
                        "line": e.position.map(|p| p.0),
                        "column": e.position.map(|p| p.1),
                        "field": e.field,
                        "message": e.message,
                    })).collect::<Vec<_>>(),
                });
                let _ = writeln!(stdout, "{v}");
            }
            for e in &errors.0 {
                let _ = writeln!(stderr, "{e}");
            }
            ExitCode::from(2)
        }
    }
}
