use super::*;
use blkmesh_proto::v1::fault_rule::Action;
use blkmesh_proto::v1::node_spec::Driver;
use blkmesh_proto::v1::{
    Bucket, FaultInjectionOptions, FaultRule, IoOp, IoUringOptions, NullOptions,
    NvmeIoUringOptions, RawOptions, ThrottleLimits, ThrottleOptions, VirtioBlkVhostUserOptions,
    VirtioBlkVhostVdpaOptions, ZonedOptions,
};

fn sample() -> State {
    let mut s = State::default();
    s.graph
        .add(NodeSpec {
            name: "n0".into(),
            driver: Some(Driver::Null(NullOptions {
                size: 1 << 20,
                latency_ns: 5,
            })),
        })
        .unwrap();
    s.graph
        .add(NodeSpec {
            name: "r0".into(),
            driver: Some(Driver::Raw(RawOptions {
                child: "n0".into(),
                offset: 512,
                size: 0,
            })),
        })
        .unwrap();
    s.sizes.insert("n0".into(), 1 << 20);
    s.sizes.insert("r0".into(), (1 << 20) - 512);
    s.workers.insert(
        "w0".into(),
        WorkerRecord {
            socket: "/run/w0.sock".into(),
            pid: 42,
        },
    );
    let export = validate_export(&VhostUserBlkExport {
        id: "e0".into(),
        node: "r0".into(),
        socket: "/run/e0.sock".into(),
        num_queues: 2,
        ..Default::default()
    })
    .unwrap();
    s.exports.insert(
        "e0".into(),
        ExportRecord {
            export,
            queues: vec!["w0".into(), "w0".into()],
            generation: 7,
        },
    );
    s
}

#[test]
fn state_round_trips_through_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let s = sample();
    save(&path, &s).unwrap();
    assert_eq!(load(&path).unwrap(), s);
    // No temporary file left behind.
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn spread_flag_round_trips_and_defaults_to_false() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let mut s = sample();
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(!text.contains("spread_queues"), "{text}");
    s.workers.insert(
        "w1".into(),
        WorkerRecord {
            socket: "/run/w1.sock".into(),
            pid: 43,
        },
    );
    let e0 = s.exports.get_mut("e0").unwrap();
    e0.export.spread_queues = true;
    e0.queues = vec!["w0".into(), "w1".into()];
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"spread_queues\": true"), "{text}");
    assert_eq!(load(&path).unwrap(), s);
}

#[test]
fn config_marks_round_trip_and_default_to_none() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let mut s = sample();
    save(&path, &s).unwrap();
    assert!(!fs::read_to_string(&path)
        .unwrap()
        .contains("managed_by_config"));
    s.config_nodes.insert("n0".into());
    s.config_exports.insert("e0".into());
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.matches("\"managed_by_config\": true").count(),
        2,
        "{text}"
    );
    assert_eq!(load(&path).unwrap(), s);
}

#[test]
fn missing_state_file_is_empty_state() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(
        load(&dir.path().join(STATE_FILE)).unwrap(),
        State::default()
    );
}

#[test]
fn rejects_state_with_unknown_worker_assignment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let mut s = sample();
    s.workers.clear();
    save(&path, &s).unwrap();
    let e = load(&path).unwrap_err();
    assert!(matches!(e, ManagerError::CorruptState { .. }), "{e}");
    assert!(e.to_string().contains("unknown worker"), "{e}");
}

#[test]
fn rejects_garbage_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    fs::write(&path, "{not json").unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains(&path.display().to_string()), "{e}");
    assert_eq!(fs::read_to_string(&path).unwrap(), "{not json");
}

/// One node of every new kind: device leaves, throttle (with absent
/// and present buckets, a group) and fault injection (every action).
fn sample_new_kinds() -> State {
    let mut s = State::default();
    let leaves = [
        Driver::NvmeIoUring(NvmeIoUringOptions {
            path: "/dev/ng0n1".into(),
            read_only: true,
        }),
        Driver::VirtioBlkVhostUser(VirtioBlkVhostUserOptions {
            path: "/run/qsd/vhost.sock".into(),
            read_only: false,
        }),
        Driver::VirtioBlkVhostVdpa(VirtioBlkVhostVdpaOptions {
            path: "/dev/vhost-vdpa-0".into(),
            read_only: false,
        }),
    ];
    for (name, driver) in ["nvme", "vu", "vdpa"].into_iter().zip(leaves) {
        s.graph
            .add(NodeSpec {
                name: name.into(),
                driver: Some(driver),
            })
            .unwrap();
        s.sizes.insert(name.into(), 0);
    }
    let limits = ThrottleLimits {
        iops_total: Some(Bucket {
            rate: 1000,
            burst: 2000,
        }),
        bps_write: Some(Bucket {
            rate: 1 << 20,
            burst: 0,
        }),
        bps_read: Some(Bucket { rate: 0, burst: 0 }),
        ..Default::default()
    };
    for (name, child) in [("t1", "nvme"), ("t2", "vu")] {
        s.graph
            .add(NodeSpec {
                name: name.into(),
                driver: Some(Driver::Throttle(ThrottleOptions {
                    child: child.into(),
                    limits: Some(limits),
                    group: "g".into(),
                })),
            })
            .unwrap();
        s.sizes.insert(name.into(), 0);
    }
    s.graph
        .add(NodeSpec {
            name: "fi".into(),
            driver: Some(Driver::FaultInjection(FaultInjectionOptions {
                child: "vdpa".into(),
                rules: vec![
                    FaultRule {
                        ops: vec![IoOp::Read as i32, IoOp::WriteZeroes as i32],
                        offset_start: 512,
                        offset_end: 1 << 20,
                        skip: 2,
                        count: 1,
                        probability: 0.25,
                        action: Some(Action::Errno(5)),
                    },
                    FaultRule {
                        action: Some(Action::DelayNs(10_000_000)),
                        ..Default::default()
                    },
                ],
                max_transfer: 64 << 10,
                max_segments: 4,
                buf_alignment: 4096,
            })),
        })
        .unwrap();
    s.sizes.insert("fi".into(), 0);
    s
}

#[test]
fn state_with_new_node_kinds_round_trips_through_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let s = sample_new_kinds();
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"IO_OP_WRITE_ZEROES\""), "{text}");
    assert!(text.contains("\"delay_ns\": \"10000000\""), "{text}");
    assert_eq!(load(&path).unwrap(), s);
}

#[test]
fn rejects_state_with_unknown_fault_op() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    save(&path, &sample_new_kinds()).unwrap();
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("IO_OP_WRITE_ZEROES", "IO_OP_FROB");
    fs::write(&path, text).unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("IO_OP_FROB"), "{e}");
}

#[test]
fn rejects_state_with_throttle_group_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    save(&path, &sample_new_kinds()).unwrap();
    // Change the first bucket of one group member only.
    let text =
        fs::read_to_string(&path)
            .unwrap()
            .replacen("\"rate\": \"1000\"", "\"rate\": \"999\"", 1);
    fs::write(&path, text).unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("throttle group \"g\""), "{e}");
}

/// Rewrites the state file at `path` through `edit` on its JSON.
fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

#[test]
fn generation_round_trips_and_defaults_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let s = sample();
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"generation\": 7"), "{text}");
    assert_eq!(load(&path).unwrap(), s);
    // A file written before generations existed.
    edit_json(&path, |v| {
        v["exports"][0]
            .as_object_mut()
            .unwrap()
            .remove("generation");
    });
    assert!(!fs::read_to_string(&path).unwrap().contains("generation"));
    assert_eq!(load(&path).unwrap().exports["e0"].generation, 0);
}

#[test]
fn fault_limits_round_trip_and_default_to_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let s = sample_new_kinds();
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"max_transfer\": \"65536\""), "{text}");
    assert!(text.contains("\"buf_alignment\": 4096"), "{text}");
    assert_eq!(load(&path).unwrap(), s);
    // Absent (an older file): zero.
    edit_json(&path, |v| {
        for n in v["nodes"].as_array_mut().unwrap() {
            let fi = n
                .get_mut("spec")
                .and_then(|d| d.get_mut("fault_injection"))
                .and_then(|f| f.as_object_mut());
            if let Some(fi) = fi {
                fi.remove("max_transfer");
                fi.remove("max_segments");
                fi.remove("buf_alignment");
            }
        }
    });
    assert!(!fs::read_to_string(&path).unwrap().contains("max_transfer"));
    let loaded = load(&path).unwrap();
    let Some(Driver::FaultInjection(o)) = &loaded.graph.get("fi").unwrap().driver else {
        panic!("fi is not a fault-injection node");
    };
    assert_eq!((o.max_transfer, o.max_segments, o.buf_alignment), (0, 0, 0));
}

/// `sample()` plus a zoned node over a null node, a raw window and a
/// throttle over it, exported.
fn sample_zoned(capacity: u64, max_open: u32) -> State {
    let mut s = sample();
    let nodes = [
        NodeSpec {
            name: "zn".into(),
            driver: Some(Driver::Null(NullOptions {
                size: 64 << 20,
                latency_ns: 0,
            })),
        },
        NodeSpec {
            name: "z".into(),
            driver: Some(Driver::Zoned(ZonedOptions {
                child: "zn".into(),
                zone_size: 4 << 20,
                zone_capacity: capacity,
                max_open_zones: max_open,
                max_active_zones: max_open * 2,
                metadata_path: "/var/lib/blkmesh/z.zones".into(),
            })),
        },
        NodeSpec {
            name: "zr".into(),
            driver: Some(Driver::Raw(RawOptions {
                child: "z".into(),
                offset: 8 << 20,
                size: 0,
            })),
        },
    ];
    for spec in nodes {
        s.graph.add(spec).unwrap();
    }
    s.sizes.insert("zn".into(), 64 << 20);
    s.sizes.insert("z".into(), 64 << 20);
    s.sizes.insert("zr".into(), 56 << 20);
    let export = validate_export(&VhostUserBlkExport {
        id: "ez".into(),
        node: "zr".into(),
        socket: "/run/ez.sock".into(),
        num_queues: 2,
        ..Default::default()
    })
    .unwrap();
    s.exports.insert(
        "ez".into(),
        ExportRecord {
            export,
            queues: vec!["w0".into(), "w0".into()],
            generation: 1,
        },
    );
    s
}

#[test]
fn zoned_nodes_round_trip_with_zero_fields_left_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    let s = sample_zoned(3 << 20, 4);
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(text.contains("\"zoned\""), "{text}");
    assert!(text.contains("\"zone_capacity\": \"3145728\""), "{text}");
    assert!(
        text.contains("\"metadata_path\": \"/var/lib/blkmesh/z.zones\""),
        "{text}"
    );
    assert_eq!(load(&path).unwrap(), s);

    let s = sample_zoned(0, 0);
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    for absent in ["zone_capacity", "max_open_zones", "max_active_zones"] {
        assert!(!text.contains(absent), "{absent}: {text}");
    }
    assert_eq!(load(&path).unwrap(), s);
}

#[test]
fn file_from_before_zoned_nodes_loads() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    // As an older manager wrote it: no zoned driver, no zone fields.
    let old = r#"{
  "version": 1,
  "nodes": [
    { "name": "n0", "size": 1048576, "driver": { "null": { "size": 1048576, "latency_ns": 5 } } },
    { "name": "r0", "size": 1048064, "driver": { "raw": { "child": "n0", "offset": 512, "size": 0 } } }
  ],
  "exports": [
    { "id": "e0", "node": "r0", "socket": "/run/e0.sock", "num_queues": 2, "queue_size": 256,
      "logical_block_size": 512, "writable": false, "serial": "e0", "queues": ["w0", "w0"],
      "generation": 7 }
  ],
  "workers": [ { "name": "w0", "socket": "/run/w0.sock", "pid": 42 } ]
}"#;
    fs::write(&path, old).unwrap();
    assert_eq!(load(&path).unwrap(), sample());
}

#[test]
fn rejects_state_breaking_zoned_rules() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    // A spread export over a zoned node.
    let mut s = sample_zoned(0, 0);
    s.exports.get_mut("ez").unwrap().export.spread_queues = true;
    save(&path, &s).unwrap();
    let e = load(&path).unwrap_err();
    assert!(
        e.to_string().contains("spreads its queues over zoned node"),
        "{e}"
    );
    // A raw window that is not zone-aligned.
    save(&path, &sample_zoned(0, 0)).unwrap();
    edit_json(&path, |v| {
        for n in v["nodes"].as_array_mut().unwrap() {
            if n["spec"]["name"] == "zr" {
                n["spec"]["raw"]["offset"] = 4096.into();
            }
        }
    });
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("node.raw.offset"), "{e}");
    // Two zoned nodes sharing a metadata file.
    let mut s = sample_zoned(0, 0);
    // n0 becomes the child of z2 instead of r0.
    s.exports.clear();
    s.graph.remove("r0").unwrap();
    s.graph
        .add(NodeSpec {
            name: "z2".into(),
            driver: Some(Driver::Zoned(ZonedOptions {
                child: "n0".into(),
                zone_size: 1 << 20,
                metadata_path: "/var/lib/blkmesh/z.zones".into(),
                ..Default::default()
            })),
        })
        .unwrap();
    s.sizes.remove("r0");
    s.sizes.insert("z2".into(), 1 << 20);
    save(&path, &s).unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("node.zoned.metadata_path"), "{e}");
}

#[test]
fn rejects_state_with_bad_fault_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    save(&path, &sample_new_kinds()).unwrap();
    let text = fs::read_to_string(&path)
        .unwrap()
        .replace("\"buf_alignment\": 4096", "\"buf_alignment\": 3000");
    fs::write(&path, text).unwrap();
    let e = load(&path).unwrap_err();
    assert!(e.to_string().contains("buf_alignment"), "{e}");
}

/// A state with a node of every kind and every optional field set
/// somewhere: io_uring (direct), null with latency, the device leaves,
/// raw windows (explicit size and to the end), throttle (a group, absent
/// and present buckets), fault injection (every action, limits), zoned
/// (capacity, open/active limits), exports (spread, writable, serial,
/// generations, queue placement over two workers) and config marks.
fn sample_every_kind() -> State {
    let mut s = sample_zoned(2 << 20, 2);
    let kinds = sample_new_kinds();
    s.sizes.extend(kinds.sizes.clone());
    let more = [
        NodeSpec {
            name: "img".into(),
            driver: Some(Driver::IoUring(IoUringOptions {
                path: "/var/lib/blkmesh/images/img.raw".into(),
                direct: true,
                read_only: false,
            })),
        },
        NodeSpec {
            name: "win".into(),
            driver: Some(Driver::Raw(RawOptions {
                child: "img".into(),
                offset: 1 << 20,
                size: 4 << 20,
            })),
        },
    ];
    let specs: Vec<NodeSpec> = s
        .graph
        .iter()
        .chain(kinds.graph.iter())
        .cloned()
        .chain(more)
        .collect();
    s.graph = Graph::from_specs(specs).unwrap();
    s.sizes.insert("img".into(), 16 << 20);
    s.sizes.insert("win".into(), 4 << 20);
    s.workers.insert(
        "w1".into(),
        WorkerRecord {
            socket: "/run/blkmesh/w1.sock".into(),
            pid: 4242,
        },
    );
    let spread = validate_export(&VhostUserBlkExport {
        id: "et".into(),
        node: "t2".into(),
        socket: "/run/et.sock".into(),
        num_queues: 3,
        queue_size: 128,
        logical_block_size: 4096,
        writable: true,
        serial: "serial-et".into(),
        spread_queues: true,
    })
    .unwrap();
    s.exports.insert(
        "et".into(),
        ExportRecord {
            export: spread,
            queues: vec!["w0".into(), "w1".into(), "w0".into()],
            generation: 3,
        },
    );
    let win = validate_export(&VhostUserBlkExport {
        id: "ew".into(),
        node: "win".into(),
        socket: "/run/ew.sock".into(),
        writable: true,
        ..Default::default()
    })
    .unwrap();
    s.exports.insert(
        "ew".into(),
        ExportRecord {
            export: win,
            queues: vec!["w1".into()],
            generation: 0,
        },
    );
    s.config_nodes
        .extend(["img".to_string(), "win".to_string()]);
    s.config_exports.insert("ew".into());
    s
}

/// The state file as the version-1 writer (hand-written serde mirror)
/// wrote it for [`sample_every_kind`], kept from before version 2.
const STATE_V1: &str = include_str!("fixtures/state-v1.json");

#[test]
fn v1_file_loads_to_the_same_state_and_is_saved_as_v2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    fs::write(&path, STATE_V1).unwrap();
    let s = sample_every_kind();
    assert_eq!(load(&path).unwrap(), s);
    // The next save writes version 2: the specs in the protobuf JSON
    // mapping, in the manager's envelope.
    save(&path, &s).unwrap();
    let text = fs::read_to_string(&path).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["version"], 2, "{text}");
    let fi = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["spec"]["name"] == "fi")
        .unwrap();
    assert_eq!(fi["spec"]["fault_injection"]["rules"][0]["errno"], 5);
    assert_eq!(
        fi["spec"]["fault_injection"]["rules"][1]["delay_ns"],
        "10000000"
    );
    assert_eq!(v["exports"][1]["export"]["spread_queues"], true, "{text}");
    assert_eq!(v["exports"][1]["queues"][1], "w1", "{text}");
    assert_eq!(load(&path).unwrap(), s);
}

/// The load error of `text` as a state file.
fn load_error(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    fs::write(&path, text).unwrap();
    let e = load(&path).unwrap_err();
    assert!(matches!(e, ManagerError::CorruptState { .. }), "{e}");
    e.to_string()
}

/// The version-1 fixture with `edit` applied to its JSON.
fn v1_edited(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut v: serde_json::Value = serde_json::from_str(STATE_V1).unwrap();
    edit(&mut v);
    v.to_string()
}

#[test]
fn rejects_v1_files_of_another_shape() {
    let e = load_error(&v1_edited(|v| {
        v["nodes"][0].as_object_mut().unwrap().remove("driver");
    }));
    assert!(e.contains("node \"fi\": missing field `driver`"), "{e}");
    let e = load_error(&v1_edited(|v| v["nodes"][1]["colour"] = "red".into()));
    assert!(e.contains("node \"img\": unknown field `colour`"), "{e}");
    let e = load_error(&v1_edited(|v| {
        v["nodes"][0]["driver"]["fault_injection"]["rules"][0]["action"] = 5.into();
    }));
    assert!(e.contains("rule action: expected an object"), "{e}");
    let e = load_error(&v1_edited(|v| {
        v["exports"][0].as_object_mut().unwrap().remove("queues");
    }));
    assert!(e.contains("export \"e0\": missing field `queues`"), "{e}");
    let e = load_error(&v1_edited(|v| v["nodes"] = 1.into()));
    assert!(e.contains("nodes: expected a list"), "{e}");
    let e = load_error(&v1_edited(|v| v["extra"] = 1.into()));
    assert!(e.contains("unknown field `extra`"), "{e}");
    // Reshaped, it still passes every rule of the API.
    let e = load_error(&v1_edited(|v| {
        v["nodes"][0]["driver"]["fault_injection"]["rules"][0]["ops"][0] = "IO_OP_FROB".into();
    }));
    assert!(e.contains("IO_OP_FROB"), "{e}");
}

#[test]
fn rejects_v2_files_of_another_shape_or_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(STATE_FILE);
    save(&path, &sample()).unwrap();
    let v2 = fs::read_to_string(&path).unwrap();
    let e = load_error(&v2.replace("\"version\": 2", "\"version\": 3"));
    assert!(e.contains("unsupported version 3 (expected 2)"), "{e}");
    let e = load_error(&v2.replace("\"generation\"", "\"generations\""));
    assert!(e.contains("unknown field `generations`"), "{e}");
    let e = load_error(&v2.replace("\"latency_ns\"", "\"latency\""));
    assert!(e.contains("latency"), "{e}");
    let e = load_error(&v2.replace("\"version\": 2,", ""));
    assert!(e.contains("missing field `version`"), "{e}");
}
