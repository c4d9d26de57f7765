use blkmesh_proto::v1::{IoUringOptions, NodeSpec, Qcow2Options};

use super::*;
use crate::core::fixtures::{state, with_export};

fn file(name: &str, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::IoUring(IoUringOptions {
            path: format!("/images/{name}"),
            read_only,
            ..Default::default()
        })),
    }
}

fn qcow2(name: &str, file: &str, backing: &str, read_only: bool) -> NodeSpec {
    NodeSpec {
        name: name.into(),
        driver: Some(Driver::Qcow2(Qcow2Options {
            file: file.into(),
            backing: backing.into(),
            read_only,
            ..Default::default()
        })),
    }
}

/// base (a raw file) under top (qcow2), exported writable as "e"; a
/// second overlay "other" over the shared, read-only "ro-base".
fn jobs_state() -> State {
    let mut s = state(
        vec![
            file("base", false),
            file("f-top", false),
            qcow2("top", "f-top", "base", false),
            file("ro-base", true),
            file("f-a", false),
            file("f-b", false),
            qcow2("a", "f-a", "ro-base", false),
            qcow2("b", "f-b", "ro-base", false),
            file("plain", false),
        ],
        &["w0"],
    );
    for (id, node) in [("e", "top"), ("ea", "a"), ("eb", "b"), ("ep", "plain")] {
        with_export(&mut s, id, node, &["w0"], false);
        s.exports.get_mut(id).unwrap().export.writable = true;
    }
    s
}

#[test]
fn a_job_needs_a_writable_qcow2_top_with_a_backing_node() {
    let s = jobs_state();
    let start = |kind, export: &str| check_start(&s, "j", kind, export, &[]);
    assert_eq!(
        start(JobKind::Stream, "e").unwrap(),
        ("top".to_string(), "base".to_string())
    );
    assert_eq!(start(JobKind::Commit, "e").unwrap().1, "base");
    // A shared base can be streamed from, never committed into.
    assert!(start(JobKind::Stream, "ea").is_ok());
    let why = start(JobKind::Commit, "ea").unwrap_err().to_string();
    assert!(why.contains("also used by b"), "{why}");
    let why = |r: Result<(String, String), GraphError>| r.unwrap_err().to_string();
    assert!(why(start(JobKind::Stream, "ep")).contains("not a qcow2 node"));
    assert!(why(start(JobKind::Stream, "nope")).contains("nope"));
    assert!(why(start(JobKind::Unspecified, "e")).contains("stream or commit"));
    assert!(why(check_start(&s, "bad name!", JobKind::Stream, "e", &[])).contains("id"));
    assert!(why(check_start(&s, "j", JobKind::Stream, "e", &["e"])).contains("already runs"));
}

#[test]
fn a_commit_writes_its_base_so_the_base_must_be_writable() {
    let mut s = jobs_state();
    s.graph = crate::core::reopen::replace_specs(
        &s.graph,
        &[("base".to_string(), file("base", true))]
            .into_iter()
            .collect(),
    )
    .unwrap();
    let why = check_start(&s, "j", JobKind::Commit, "e", &[])
        .unwrap_err()
        .to_string();
    assert!(why.contains("read-only"), "{why}");
    // A read-only export changes nothing.
    let mut s = jobs_state();
    s.exports.get_mut("e").unwrap().export.writable = false;
    let why = check_start(&s, "j", JobKind::Stream, "e", &[])
        .unwrap_err()
        .to_string();
    assert!(why.contains("does not write"), "{why}");
}

#[test]
fn a_finished_stream_drops_the_backing_and_a_commit_moves_the_export() {
    let s = jobs_state();
    let next = streamed(&s, "top").unwrap();
    match &next.graph.get("top").unwrap().driver {
        Some(Driver::Qcow2(q)) => assert!(q.backing.is_empty() && !q.no_backing),
        other => panic!("{other:?}"),
    }
    assert!(next.graph.get("base").is_some(), "the base node stays");
    assert!(streamed(&s, "nope").is_err());
    let next = committed(&s, "e", "base");
    assert_eq!(next.exports["e"].export.node, "base");
    assert!(next.graph.get("top").is_some(), "the top node stays");
}
