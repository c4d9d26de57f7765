//! Parsing and checking configuration files: every kind of error, with
//! its line, column and field.

use super::*;
use crate::config::document::position;
use crate::config::fields::{export_field, node_field};
use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::IoOp;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, IoUringOptions, NodeSpec, NullOptions, RawOptions,
    ThrottleOptions,
};

/// Every error of `text`, as printed.
fn errors(text: &str) -> Vec<String> {
    match check_str("c.toml", text) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

/// The single error of `text`.
fn error(text: &str) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    errs.into_iter().next().unwrap()
}

/// Asserts that `text` has one error, at line `line` where `at` starts on
/// it (the first occurrence), about `field`, containing `needle`.
#[track_caller]
fn assert_error(text: &str, (line, at): (usize, &str), field: &str, needle: &str) {
    let e = error(text);
    let line_text = text.lines().nth(line - 1).unwrap_or("");
    let col = match line_text.find(at) {
        Some(i) => line_text[..i].chars().count() + 1,
        None => panic!("{at:?} not on line {line}: {line_text:?}"),
    };
    let prefix = if field.is_empty() {
        format!("c.toml:{line}:{col}: ")
    } else {
        format!("c.toml:{line}:{col}: {field}: ")
    };
    assert!(e.starts_with(&prefix), "want {prefix:?}, got {e:?}");
    assert!(e.contains(needle), "want {needle:?} in {e:?}");
}

fn ok(text: &str) -> Config {
    match check_str("c.toml", text) {
        Ok(c) => c,
        Err(e) => panic!("{e}"),
    }
}

const NULL_A: &str = "[[node]]\nname = \"a\"\nnull = { size = \"1M\" }\n";

#[test]
fn example_file_is_valid() {
    let text = include_str!("../../../../deploy/config/blkmesh.toml");
    let c = ok(text);
    let names: Vec<&str> = c.nodes().iter().map(|n| n.spec.name.as_str()).collect();
    assert_eq!(names, ["disk0", "slow", "scratch-base", "scratch"]);
    assert_eq!(c.nodes()[0].create, Some(1 << 30));
    let ids: Vec<&str> = c.exports().iter().map(|e| e.export.id.as_str()).collect();
    assert_eq!(ids, ["disk0", "scratch"]);
    assert_eq!(c.exports()[0].export.num_queues, 2);
    assert!(c.exports()[0].export.writable);

    // The commented-out examples are valid too, once uncommented.
    let mut inside = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.starts_with("# --- examples: begin") {
            inside = true;
        } else if line.starts_with("# --- examples: end") {
            inside = false;
        } else if inside {
            let line = line
                .strip_prefix("# ")
                .unwrap_or(line.trim_start_matches('#'));
            lines.push(line.to_string());
            continue;
        }
        lines.push(line.to_string());
    }
    let all = lines.join("\n");
    let c = ok(&all);
    let names: Vec<&str> = c.nodes().iter().map(|n| n.spec.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "disk0",
            "slow",
            "scratch-base",
            "scratch",
            "flaky",
            "scratch2",
            "zns",
            "zns-base",
            "nvme",
            "remote",
            "vdpa"
        ]
    );
    assert_eq!(c.exports().len(), 3);

    // The error shown in the file's header is the one it gets.
    let broken = text.replace("bps = \"200M\"", "bps = \"200X\"");
    let e = check_str("blkmesh.toml", &broken).unwrap_err().to_string();
    assert!(text.contains(&format!("#   {e}\n")), "{e}");
}

#[test]
fn parses_every_driver_with_friendly_values() {
    let c = ok(r#"
[[node]]
name = "f"
io_uring = { path = "/img/f.img", direct = true, read_only = true }
create = { size = 1048576 }

[[node]]
name = "n"
null = { size = "1G", latency = "5us" }

[[node]]
name = "nvme"
nvme_io_uring = { path = "/dev/ng0n1", read_only = true }

[[node]]
name = "vu"
virtio_blk_vhost_user = { path = "/run/qsd.sock" }

[[node]]
name = "vdpa"
virtio_blk_vhost_vdpa = { path = "/dev/vhost-vdpa-0" }

[[node]]
name = "r"
raw = { child = "n", offset = "512M", size = "256M" }

[[node]]
name = "t"
throttle = { child = "r", iops = 100, iops_burst = 200, iops_read = 50, iops_write_burst = 0, bps = "1M", bps_burst = "2M", bps_read = 8192, bps_write = "4k", group = "g" }

[[node]]
name = "fi"
[node.fault_injection]
child = "t"
rules = ["ops=read+write,start=4k,end=1M,skip=1,count=2,prob=0.5,errno=EIO", { ops = "flush", delay = "1ms", count = 3 }]
max_transfer = "64k"
max_segments = 4
buf_alignment = "4k"

[[node]]
name = "zn"
null = { size = "64M" }

[[node]]
name = "z"
zoned = { child = "zn", zone_size = "4M", zone_capacity = "3M", max_open_zones = 2, max_active_zones = 4, metadata_path = "/img/z.zones" }

[[export]]
id = "e"
node = "fi"
socket = "/run/e.sock"
num_queues = 4
queue_size = 128
logical_block_size = 4096
writable = true
serial = "S1"
spread_queues = true
"#);
    let spec = |name: &str| {
        c.nodes()
            .iter()
            .find(|n| n.spec.name == name)
            .unwrap()
            .spec
            .driver
            .clone()
            .unwrap()
    };
    assert_eq!(
        spec("f"),
        Driver::IoUring(IoUringOptions {
            path: "/img/f.img".into(),
            direct: true,
            read_only: true
        })
    );
    assert_eq!(c.nodes()[0].create, Some(1 << 20));
    assert_eq!(
        spec("n"),
        Driver::Null(NullOptions {
            size: 1 << 30,
            latency_ns: 5000
        })
    );
    assert_eq!(
        spec("r"),
        Driver::Raw(RawOptions {
            child: "n".into(),
            offset: 512 << 20,
            size: 256 << 20
        })
    );
    let Driver::Throttle(t) = spec("t") else {
        panic!()
    };
    let l = t.limits.unwrap();
    assert_eq!(t.group, "g");
    assert_eq!(
        l.iops_total,
        Some(Bucket {
            rate: 100,
            burst: 200
        })
    );
    assert_eq!(l.iops_read, Some(Bucket { rate: 50, burst: 0 }));
    assert_eq!(l.iops_write, Some(Bucket { rate: 0, burst: 0 }));
    assert_eq!(
        l.bps_total,
        Some(Bucket {
            rate: 1 << 20,
            burst: 2 << 20
        })
    );
    assert_eq!(
        l.bps_read,
        Some(Bucket {
            rate: 8192,
            burst: 0
        })
    );
    assert_eq!(
        l.bps_write,
        Some(Bucket {
            rate: 4096,
            burst: 0
        })
    );
    let Driver::FaultInjection(fi) = spec("fi") else {
        panic!()
    };
    assert_eq!(fi.rules.len(), 2);
    assert_eq!(fi.rules[0].ops, [IoOp::Read as i32, IoOp::Write as i32]);
    assert_eq!(fi.rules[0].action, Some(Action::Errno(5)));
    assert_eq!(fi.rules[1].action, Some(Action::DelayNs(1_000_000)));
    assert_eq!(fi.rules[1].count, 3);
    assert_eq!(
        (fi.max_transfer, fi.max_segments, fi.buf_alignment),
        (64 << 10, 4, 4096)
    );
    let Driver::Zoned(z) = spec("z") else {
        panic!()
    };
    assert_eq!((z.zone_size, z.zone_capacity), (4 << 20, 3 << 20));
    assert_eq!((z.max_open_zones, z.max_active_zones), (2, 4));
    let e = &c.exports()[0].export;
    assert_eq!(
        (e.num_queues, e.queue_size, e.logical_block_size),
        (4, 128, 4096)
    );
    assert!(e.writable && e.spread_queues);
    assert_eq!(e.serial, "S1");
}

#[test]
fn empty_file_is_valid() {
    let c = ok("# nothing yet\n");
    assert!(c.nodes().is_empty() && c.exports().is_empty());
}

#[test]
fn syntax_errors_have_line_and_column() {
    let e = error("[[node]]\nname = \"a\"\nnull = { size = 512 \n");
    assert!(
        e.starts_with("c.toml:3:") && e.contains("invalid TOML"),
        "{e}"
    );
    // Just past `[[node]`, where `]` is missing.
    let e = error("[[node]\n");
    assert!(
        e.starts_with("c.toml:1:8: invalid TOML: unclosed array table"),
        "{e}"
    );
    // Keys given twice are a TOML error too.
    assert_error(
        "[[node]]\nname = \"a\"\nname = \"b\"\nnull = { size = 512 }\n",
        (3, "name"),
        "",
        "invalid TOML: duplicate key",
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_error(
        "[[node]]\nname = 5\nnull = { size = 512 }\n",
        (2, "5"),
        "node[0].name",
        "expected a string, got an integer",
    );
    assert_error(
        "[[node]]\nname = \"f\"\nio_uring = { path = \"/f\", direct = \"yes\" }\n",
        (3, "\"yes\""),
        "node[0].io_uring.direct",
        "expected true or false, got a string",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = \"big\"\n",
        (3, "\"big\""),
        "node[0].null",
        "expected a table, got a string",
    );
    assert_error(
        "node = 3\n",
        (1, "3"),
        "node",
        "expected an array of tables ([[node]] sections), got an integer",
    );
    let export = |line: &str| {
        format!("{NULL_A}[[export]]\nid = \"e\"\nnode = \"a\"\nsocket = \"/e.sock\"\n{line}\n")
    };
    assert_error(
        &export("num_queues = \"2\""),
        (8, "\"2\""),
        "export[0].num_queues",
        "expected an integer, got a string",
    );
    assert_error(
        &export("num_queues = -1"),
        (8, "-1"),
        "export[0].num_queues",
        "must not be negative",
    );
    assert_error(
        &export("queue_size = 4294967296"),
        (8, "42"),
        "export[0].queue_size",
        "must be at most 4294967295",
    );
}

#[test]
fn unknown_keys_are_refused_where_they_are() {
    assert_error(
        "nodes = []\n",
        (1, "nodes"),
        "nodes",
        "unknown top-level key \"nodes\" (expected one of: node, export)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512 }\nsize = 3\n",
        (4, "size"),
        "node[0].size",
        "unknown key \"size\"",
    );
    assert_error(
        "[[node]]\nname = \"t\"\n[node.throttle]\nchild = \"a\"\niopz = 3\n",
        (5, "iopz"),
        "node[0].throttle.iopz",
        "unknown key \"iopz\" (expected one of: child, group, iops,",
    );
    assert_error(
        &format!(
            "{NULL_A}[[export]]\nid = \"e\"\nnode = \"a\"\nsocket = \"/e.sock\"\nspread = true\n"
        ),
        (8, "spread"),
        "export[0].spread",
        "unknown key \"spread\"",
    );
    assert_error(
        &format!(
            "{NULL_A}[[node]]\nname = \"f\"\nfault_injection = {{ child = \"a\", rules = [{{ errno = 5, when = 1 }}] }}\n"
        ),
        (6, "when"),
        "node[1].fault_injection.rules[0].when",
        "unknown key \"when\"",
    );
}

#[test]
fn missing_keys_and_drivers() {
    assert_error(
        "[[node]]\nnull = { size = 512 }\n",
        (1, "[[node]]"),
        "node[0].name",
        "missing: the node's name",
    );
    assert_error(
        "[[node]]\nname = \"a\"\n",
        (1, "[[node]]"),
        "node[0]",
        "no driver: give one of io_uring, null,",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512 }\nraw = { child = \"b\" }\n",
        (4, "{"),
        "node[0].raw",
        "a node has one driver (it has null already)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nio_uring = { direct = true }\n",
        (3, "{"),
        "node[0].io_uring.path",
        "missing: the absolute path",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { latency = \"1us\" }\n",
        (3, "{"),
        "node[0].null.size",
        "missing",
    );
    assert_error(
        &format!("{NULL_A}[[export]]\nid = \"e\"\nnode = \"a\"\n"),
        (4, "[[export]]"),
        "export[0].socket",
        "missing: the absolute path of the vhost-user socket",
    );
}

#[test]
fn bad_sizes_and_durations() {
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = \"1X\" }\n",
        (3, "\"1X\""),
        "node[0].null.size",
        "unknown size suffix 'X' in \"1X\" (use k, M, G or T)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 1.5 }\n",
        (3, "1.5"),
        "node[0].null.size",
        "expected a size",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512, latency = \"5 parsecs\" }\n",
        (3, "\"5 parsecs\""),
        "node[0].null.latency",
        "invalid duration",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512, latency = 5 }\n",
        (3, "5 }"),
        "node[0].null.latency",
        "expected a duration with a unit",
    );
    // API validation of sizes, mapped to the file's fields.
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 1000 }\n",
        (3, "1000"),
        "node[0].null.size",
        "must be a non-zero multiple of 512 (got 1000)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512, latency = \"11s\" }\n",
        (3, "\"11s\""),
        "node[0].null.latency",
        "must be at most",
    );
    assert_error(
        &format!("{NULL_A}[[node]]\nname = \"r\"\nraw = {{ child = \"a\", offset = 100 }}\n"),
        (6, "100"),
        "node[1].raw.offset",
        "must be a multiple of 512 (got 100)",
    );
}

#[test]
fn create_is_for_io_uring_files_of_whole_sectors() {
    assert_error(
        "[[node]]\nname = \"a\"\nnull = { size = 512 }\ncreate = { size = \"1G\" }\n",
        (4, "{"),
        "node[0].create",
        "only io_uring nodes have a file to create (this is a null node)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nio_uring = { path = \"/a\" }\ncreate = { size = 1000 }\n",
        (4, "1000"),
        "node[0].create.size",
        "must be a non-zero multiple of 512 (got 1000)",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nio_uring = { path = \"/a\" }\ncreate = {}\n",
        (4, "{"),
        "node[0].create.size",
        "missing",
    );
}

#[test]
fn api_validation_names_the_files_fields() {
    assert_error(
        "[[node]]\nname = \"a b\"\nnull = { size = 512 }\n",
        (2, "\"a b\""),
        "node[0].name",
        "must contain only A-Z a-z 0-9 _ . -",
    );
    assert_error(
        "[[node]]\nname = \"a\"\nio_uring = { path = \"disk.img\" }\n",
        (3, "\"disk.img\""),
        "node[0].io_uring.path",
        "must be an absolute path (got \"disk.img\")",
    );
    // Throttle buckets map back to the CLI-style keys.
    let t = |limits: &str| {
        format!("{NULL_A}[[node]]\nname = \"t\"\nthrottle = {{ child = \"a\", {limits} }}\n")
    };
    assert_error(
        &t("iops = 10, iops_burst = 5"),
        (6, "5 }"),
        "node[1].throttle.iops_burst",
        "must be 0 or >= rate (got 5 < 10)",
    );
    assert_error(
        &t("bps_read = 100"),
        (6, "100"),
        "node[1].throttle.bps_read",
        "must be 0 or >= 4096 bytes/s unless burst is set",
    );
    assert_error(
        &t("iops_write_burst = 5"),
        (6, "5 }"),
        "node[1].throttle.iops_write_burst",
        "must be 0 when rate is 0",
    );
    assert_error(
        &format!("{NULL_A}[[node]]\nname = \"t\"\nthrottle = {{ child = \"a\" }}\n"),
        (6, "{"),
        "node[1].throttle",
        "throttle with no limit",
    );
    assert_error(
        &t("iops = 1, group = \"-g\""),
        (6, "\"-g\""),
        "node[1].throttle.group",
        "must start with a letter or digit",
    );
    // Fault rules, as text and as tables.
    let fi = |rules: &str| {
        format!("{NULL_A}[[node]]\nname = \"f\"\n[node.fault_injection]\nchild = \"a\"\nrules = [{rules}]\n")
    };
    assert_error(
        &fi("\"ops=read,errno=EFROB\""),
        (8, "\"ops"),
        "node[1].fault_injection.rules[0]",
        "key \"errno\": unknown errno \"EFROB\"",
    );
    assert_error(
        &fi("\"errno=5\", { errno = 0 }"),
        (8, "0 }"),
        "node[1].fault_injection.rules[1].errno",
        "must be in 1..=4095 (got 0)",
    );
    assert_error(
        &fi("{ ops = \"read\" }"),
        (8, "{"),
        "node[1].fault_injection.rules[0]",
        "needs an action: errno or delay",
    );
    assert_error(
        &fi("{ errno = 5, delay = \"1s\" }"),
        (8, "\"1s\""),
        "node[1].fault_injection.rules[0].delay",
        "a rule has one action",
    );
    assert_error(
        &fi("{ errno = 5, prob = 2.5 }"),
        (8, "2.5"),
        "node[1].fault_injection.rules[0].prob",
        "must be a number in [0, 1]",
    );
    // The manager's own checks (fault limits) too.
    assert_error(
        &format!("{NULL_A}[[node]]\nname = \"f\"\nfault_injection = {{ child = \"a\", max_transfer = 1000 }}\n"),
        (6, "1000"),
        "node[1].fault_injection.max_transfer",
        "must be 0 (the child's limit) or a multiple of 512",
    );
    assert_error(
        &format!("{NULL_A}[[node]]\nname = \"z\"\nzoned = {{ child = \"a\", zone_size = \"100k\", metadata_path = \"/z\" }}\n"),
        (6, "\"100k\""),
        "node[1].zoned.zone_size",
        "must be a power of two",
    );
}

#[test]
fn graph_errors_unknown_child_cycle_duplicates() {
    assert_error(
        "[[node]]\nname = \"t\"\nthrottle = { child = \"c\", iops = 1 }\n",
        (3, "\"c\""),
        "node[0].throttle.child",
        "node \"c\" is not defined in this file",
    );
    assert_error(
        &format!("{NULL_A}{NULL_A}"),
        (5, "\"a\""),
        "node[1].name",
        "node \"a\" is defined twice (first at line 1)",
    );
    // b -> a -> b (through throttle and raw), reported once, at the first.
    assert_error(
        "[[node]]\nname = \"b\"\nthrottle = { child = \"a\", iops = 1 }\n[[node]]\nname = \"a\"\nraw = { child = \"b\" }\n",
        (3, "\"a\""),
        "node[0].throttle.child",
        "nodes form a cycle: b -> a -> b",
    );
    // A node leading into a cycle, and a second cycle: each cycle once.
    let errs = errors(
        "[[node]]\nname = \"a\"\nraw = { child = \"b\" }\n\
         [[node]]\nname = \"b\"\nraw = { child = \"c\" }\n\
         [[node]]\nname = \"c\"\nraw = { child = \"b\" }\n\
         [[node]]\nname = \"x\"\nraw = { child = \"y\" }\n\
         [[node]]\nname = \"y\"\nraw = { child = \"x\" }\n\
         [[node]]\nname = \"top\"\nthrottle = { child = \"a\", iops = 1 }\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].contains("node[1].raw.child: nodes form a cycle: b -> c -> b"),
        "{errs:#?}"
    );
    assert!(
        errs[1].contains("node[3].raw.child: nodes form a cycle: x -> y -> x"),
        "{errs:#?}"
    );
    // Two parents for one child.
    assert_error(
        &format!(
            "{NULL_A}[[node]]\nname = \"r1\"\nraw = {{ child = \"a\" }}\n[[node]]\nname = \"r2\"\nraw = {{ child = \"a\" }}\n"
        ),
        (9, "\"a\""),
        "node[2].raw.child",
        "node \"a\" is already the child of node \"r1\"",
    );
    // A throttle group carries one set of limits.
    let two = format!(
        "{NULL_A}[[node]]\nname = \"b\"\nnull = {{ size = 512 }}\n\
         [[node]]\nname = \"t1\"\nthrottle = {{ child = \"a\", iops = 10, group = \"g\" }}\n\
         [[node]]\nname = \"t2\"\nthrottle = {{ child = \"b\", iops = 20, group = \"g\" }}\n"
    );
    assert_error(
        &two,
        (12, "{"),
        "node[3].throttle",
        "has other limits than node \"t1\" of throttle group \"g\"",
    );
    // A node over a broken one is not reported again.
    let errs = errors(
        "[[node]]\nname = \"a\"\nnull = { size = 1 }\n[[node]]\nname = \"t\"\nthrottle = { child = \"a\", iops = 1 }\n",
    );
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(
        errs[0].starts_with("c.toml:3:17: node[0].null.size"),
        "{errs:#?}"
    );
}

#[test]
fn export_errors() {
    let e = |fields: &str| format!("{NULL_A}[[export]]\nid = \"e\"\nnode = \"a\"\n{fields}\n");
    assert_error(
        &e("socket = \"e.sock\""),
        (7, "\"e.sock\""),
        "export[0].socket",
        "must be an absolute path",
    );
    assert_error(
        &e("socket = \"/e.sock\"\nnum_queues = 65"),
        (8, "65"),
        "export[0].num_queues",
        "must be 1-64 (got 65)",
    );
    assert_error(
        &e("socket = \"/e.sock\"\nserial = \"0123456789abcdefghijk\""),
        (8, "\"0"),
        "export[0].serial",
        "must be at most 20 bytes",
    );
    assert_error(
        &format!("{NULL_A}[[export]]\nid = \"e\"\nnode = \"x\"\nsocket = \"/e.sock\"\n"),
        (6, "\"x\""),
        "export[0].node",
        "node \"x\" is not defined in this file",
    );
    let two = |second: &str| {
        format!(
            "{NULL_A}[[node]]\nname = \"b\"\nnull = {{ size = 512 }}\n\
             [[export]]\nid = \"e\"\nnode = \"a\"\nsocket = \"/e.sock\"\n\
             [[export]]\n{second}\n"
        )
    };
    assert_error(
        &two("id = \"e\"\nnode = \"b\"\nsocket = \"/f.sock\""),
        (12, "\"e\""),
        "export[1].id",
        "export \"e\" is defined twice (first at line 7)",
    );
    assert_error(
        &two("id = \"f\"\nnode = \"b\"\nsocket = \"/e.sock\""),
        (14, "\"/e.sock\""),
        "export[1].socket",
        "socket \"/e.sock\" is already used by export \"e\" (first at line 7)",
    );
    assert_error(
        &two("id = \"f\"\nnode = \"a\"\nsocket = \"/f.sock\""),
        (13, "\"a\""),
        "export[1].node",
        "node \"a\" is already exported by export \"e\"",
    );
    // Rules AddExport checks against the graph.
    assert_error(
        "[[node]]\nname = \"f\"\nio_uring = { path = \"/f\", read_only = true }\n\
         [[export]]\nid = \"e\"\nnode = \"f\"\nsocket = \"/e.sock\"\nwritable = true\n",
        (8, "true"),
        "export[0].writable",
        "node \"f\" is read-only; a writable export needs a writable node",
    );
    assert_error(
        &format!(
            "{NULL_A}[[node]]\nname = \"t\"\nthrottle = {{ child = \"a\", iops = 1 }}\n\
             [[export]]\nid = \"e\"\nnode = \"t\"\nsocket = \"/e.sock\"\nspread_queues = true\n"
        ),
        (11, "true"),
        "export[0].spread_queues",
        "is a throttle without a group",
    );
}

#[test]
fn every_error_is_reported_in_file_order() {
    let errs = errors(
        "[[node]]\nname = \"a\"\nnull = { size = \"1X\" }\n\
         [[node]]\nname = \"b\"\nnull = { size = 512, colour = \"red\" }\n\
         [[export]]\nid = \"e\"\nnode = \"zzz\"\nsocket = \"/e\"\n",
    );
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(
        errs[0].starts_with("c.toml:3:17: node[0].null.size"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("c.toml:6:22: node[1].null.colour"),
        "{errs:#?}"
    );
    // Once the types are right, the semantic errors of every object.
    let errs = errors(
        "[[node]]\nname = \"a\"\nnull = { size = 1000 }\n\
         [[node]]\nname = \"b\"\nio_uring = { path = \"rel\" }\n\
         [[export]]\nid = \"e\"\nnode = \"zzz\"\nsocket = \"/e\"\n",
    );
    assert_eq!(errs.len(), 3, "{errs:#?}");
    assert!(
        errs[0].starts_with("c.toml:3:17: node[0].null.size"),
        "{errs:#?}"
    );
    assert!(
        errs[1].starts_with("c.toml:6:21: node[1].io_uring.path"),
        "{errs:#?}"
    );
    assert!(
        errs[2].starts_with("c.toml:9:8: export[0].node"),
        "{errs:#?}"
    );
}

#[test]
fn columns_count_characters() {
    // "é" is two bytes; the column of the value after it counts it once.
    let text = "# é\n[[node]]\nname = \"a\"\nio_uring = { path = \"/é\", direct = \"x\" }\n";
    let e = error(text);
    assert!(
        e.starts_with("c.toml:4:36: node[0].io_uring.direct: "),
        "{e}"
    );
    assert_error(
        text,
        (4, "\"x\""),
        "node[0].io_uring.direct",
        "expected true or false",
    );
    assert_eq!(position("aé\nxyz", 3), (1, 3));
    assert_eq!(position("aé\nxyz", 5), (2, 2));
    assert_eq!(position("ab", 99), (1, 3));
}

#[test]
fn errors_without_a_place_print_the_file() {
    let e = ConfigError {
        file: "/etc/blkmesh/blkmesh.toml".into(),
        position: None,
        field: String::new(),
        message: "cannot read the configuration file: gone".into(),
    };
    assert_eq!(
        e.to_string(),
        "/etc/blkmesh/blkmesh.toml: cannot read the configuration file: gone"
    );
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.toml");
    let errs = check(&missing).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert!(errs.0[0].position.is_none());
    assert!(
        errs.to_string().contains("nope.toml: cannot read"),
        "{errs}"
    );
    std::fs::write(&missing, b"\xff\xfe").unwrap();
    let errs = check(&missing).unwrap_err();
    assert!(errs.to_string().contains("not valid UTF-8"), "{errs}");
}

#[test]
fn api_fields_map_to_paths_in_the_file() {
    let spec = |driver| NodeSpec {
        name: "n".into(),
        driver: Some(driver),
    };
    let t = spec(Driver::Throttle(ThrottleOptions::default()));
    assert_eq!(
        node_field(&t, "node.throttle.limits.iops_total.rate"),
        "throttle.iops"
    );
    assert_eq!(
        node_field(&t, "node.throttle.limits.bps_write.burst"),
        "throttle.bps_write_burst"
    );
    assert_eq!(node_field(&t, "node.throttle.limits"), "throttle");
    assert_eq!(node_field(&t, "node.throttle.child"), "throttle.child");
    assert_eq!(node_field(&t, "node.name"), "name");
    assert_eq!(node_field(&t, "node"), "");
    let n = spec(Driver::Null(NullOptions::default()));
    assert_eq!(node_field(&n, "node.null.latency_ns"), "null.latency");
    assert_eq!(node_field(&n, "size"), "null.size");
    let f = spec(Driver::FaultInjection(FaultInjectionOptions::default()));
    assert_eq!(
        node_field(&f, "node.fault_injection.rules[2].offset_end"),
        "fault_injection.rules[2].end"
    );
    assert_eq!(
        node_field(&f, "node.fault_injection.rules[0].action"),
        "fault_injection.rules[0]"
    );
    assert_eq!(node_field(&f, "size"), "");
    assert_eq!(export_field("export.num_queues"), "num_queues");
    assert_eq!(export_field("queue"), "");
}
