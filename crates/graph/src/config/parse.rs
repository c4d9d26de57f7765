//! Parsing a configuration file: its nodes (with their drivers and fault
//! rules) and exports.

use std::collections::BTreeMap;
use std::path::Path;

use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoUringOptions, NodeSpec, NullOptions,
    NvmeIoUringOptions, Qcow2Options, RawOptions, ThrottleLimits, ThrottleOptions,
    VhostUserBlkExport, VirtioBlkVhostUserOptions, VirtioBlkVhostVdpaOptions, ZonedOptions,
};
use toml::de::{DeTable, DeValue};

use crate::rule::{parse_rule, RuleBuilder, RULE_KEYS};

use crate::config::document::ConfigError;
use crate::config::document::{Config, ConfigErrors, ConfigExport, ConfigNode, MAX_CONFIG_LEN};
use crate::config::fields::THROTTLE_KEYS;
use crate::config::reader::{a_type, Parser, Tbl};
use crate::kinds::KIND_NAMES as DRIVERS;

/// Reads and parses the file at `path` (types and keys; see [`crate::config::check`]).
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

impl Parser<'_> {
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
                Some(n) if n == 0 || n % crate::fields::SECTOR_SIZE != 0 => {
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
            "qcow2" => {
                let file =
                    self.required_string(&mut t, "file", "the name of the node holding the image");
                let backing = self.string(&mut t, "backing").unwrap_or_default();
                let no_backing = self.bool(&mut t, "no_backing").unwrap_or(false);
                let read_only = self.bool(&mut t, "read_only").unwrap_or(false);
                let size = self.size(&mut t, "size").unwrap_or(0);
                (
                    file.map(|file| {
                        Driver::Qcow2(Qcow2Options {
                            file,
                            backing,
                            no_backing,
                            read_only,
                            size,
                        })
                    }),
                    &["file", "backing", "no_backing", "read_only", "size"],
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
            "fault_injection" => {
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
            // A kind without keys of its own here: the API's JSON.
            _ => return self.api_driver(node, kind),
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
