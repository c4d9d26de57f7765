use super::*;
use crate::core::error::ApiError;
use crate::core::fixtures::{live, null, state, with_export, zoned, MIB};

fn workers_of(moved: &[MovedQueue]) -> Vec<(String, u32, String, String)> {
    moved
        .iter()
        .map(|m| (m.export.clone(), m.queue, m.from.clone(), m.to.clone()))
        .collect()
}

fn m(export: &str, queue: u32, from: &str, to: &str) -> (String, u32, String, String) {
    (export.into(), queue, from.into(), to.into())
}

#[test]
fn a_new_export_goes_to_the_least_loaded_live_worker_ties_by_name() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0", "w1", "w2"]);
    with_export(&mut s, "ea", "a", &["w0", "w0"], false);
    let e = blkmesh_graph::validate_export(&crate::core::fixtures::export("eb", "b", 3, false))
        .unwrap();
    // w1 and w2 have none; w1 comes first by name. w0 is not live: ignored.
    let q = place_queues(&s, &live(&["w0", "w1", "w2"]), &e).unwrap();
    assert_eq!(q, vec!["w1"; 3]);
    let q = place_queues(&s, &live(&["w0", "w2"]), &e).unwrap();
    assert_eq!(q, vec!["w2"; 3]);
}

#[test]
fn a_spread_export_goes_round_robin_least_loaded_first() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0", "w1"]);
    with_export(&mut s, "ea", "a", &["w0"], false);
    let e =
        blkmesh_graph::validate_export(&crate::core::fixtures::export("eb", "b", 3, true)).unwrap();
    let q = place_queues(&s, &live(&["w0", "w1"]), &e).unwrap();
    assert_eq!(q, vec!["w1", "w0", "w1"]);
}

#[test]
fn no_live_worker_no_placement() {
    let s = state(vec![null("a", MIB)], &["w0"]);
    let e =
        blkmesh_graph::validate_export(&crate::core::fixtures::export("e", "a", 1, false)).unwrap();
    assert!(matches!(
        place_queues(&s, &live(&[]), &e),
        Err(ApiError::NoLiveWorker)
    ));
}

#[test]
fn lost_queues_of_an_unspread_export_stay_together() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0", "w1", "w2"]);
    // w1 serves most of `ea`'s surviving queues: the lost one joins them,
    // although w2 is less loaded.
    with_export(&mut s, "ea", "a", &["w0", "w1", "w1"], false);
    with_export(&mut s, "eb", "b", &["w0", "w0"], false);
    let lost = BTreeSet::from(["w0".to_string()]);
    let moved = plan_reassign(&s, &live(&["w1", "w2"]), &lost);
    assert_eq!(
        workers_of(&moved),
        vec![
            m("ea", 0, "w0", "w1"),
            // All of `eb` was lost: together, on the least loaded worker.
            m("eb", 0, "w0", "w2"),
            m("eb", 1, "w0", "w2"),
        ]
    );
}

#[test]
fn lost_queues_of_a_spread_export_go_one_by_one_to_the_least_loaded() {
    let mut s = state(vec![null("a", MIB)], &["w0", "w1", "w2"]);
    with_export(&mut s, "ea", "a", &["w0", "w0", "w0", "w1"], true);
    let lost = BTreeSet::from(["w0".to_string()]);
    let moved = plan_reassign(&s, &live(&["w1", "w2"]), &lost);
    assert_eq!(
        workers_of(&moved),
        vec![
            m("ea", 0, "w0", "w2"),
            m("ea", 1, "w0", "w1"),
            m("ea", 2, "w0", "w2"),
        ]
    );
    // Nobody to move them to: nothing planned.
    assert!(plan_reassign(&s, &live(&["w0"]), &lost).is_empty());
}

#[test]
fn drain_moves_each_queue_to_the_least_loaded_other_worker() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0", "w1", "w2"]);
    with_export(&mut s, "ea", "a", &["w0", "w0", "w1"], true);
    with_export(&mut s, "eb", "b", &["w2"], false);
    let moved = plan_drain(&s, &live(&["w0", "w1", "w2"]), "w0").unwrap();
    // w1 and w2 both hold one queue: w1 first by name, then w2.
    assert_eq!(
        workers_of(&moved),
        vec![m("ea", 0, "w0", "w1"), m("ea", 1, "w0", "w2")]
    );
    // A worker without queues: nothing to do, even with nobody to take any.
    let idle = state(vec![null("a", MIB)], &["w0"]);
    assert_eq!(plan_drain(&idle, &live(&["w0"]), "w0").unwrap(), Vec::new());
}

#[test]
fn drain_keeps_a_zoned_export_on_one_worker() {
    let mut s = state(
        vec![null("a", 8 * MIB), zoned("z", "a"), null("b", MIB)],
        &["w0", "w1", "w2"],
    );
    with_export(&mut s, "ez", "z", &["w0", "w0", "w0"], false);
    with_export(&mut s, "eb", "b", &["w1"], false);
    let moved = plan_drain(&s, &live(&["w0", "w1", "w2"]), "w0").unwrap();
    let targets: BTreeSet<&str> = moved.iter().map(|m| m.to.as_str()).collect();
    assert_eq!(moved.len(), 3);
    assert_eq!(targets, BTreeSet::from(["w2"]));
}

#[test]
fn drain_without_another_live_worker_is_refused() {
    let mut s = state(vec![null("a", MIB)], &["w0", "w1"]);
    with_export(&mut s, "ea", "a", &["w0"], false);
    let err = plan_drain(&s, &live(&["w0"]), "w0").unwrap_err();
    assert!(err.to_string().contains("no other live worker"), "{err}");
}

#[test]
fn move_node_moves_the_exports_above_it_only() {
    let mut s = state(
        vec![
            null("a", MIB),
            crate::core::fixtures::throttle("t", "a", 100, ""),
            null("b", MIB),
        ],
        &["w0", "w1"],
    );
    with_export(&mut s, "et", "t", &["w0", "w1"], true);
    with_export(&mut s, "eb", "b", &["w0"], false);
    // `a` is under `t`: export `et` moves, its queue already on w1 is not listed.
    let moved = plan_move_node(&s, "a", "w1");
    assert_eq!(workers_of(&moved), vec![m("et", 0, "w0", "w1")]);
    let mut next = s.clone();
    apply_moves(&mut next, &moved);
    assert_eq!(next.exports["et"].queues, vec!["w1", "w1"]);
    assert_eq!(next.exports["eb"], s.exports["eb"]);
}

#[test]
fn a_move_of_an_unknown_queue_changes_nothing() {
    let mut s = state(vec![null("a", MIB)], &["w0", "w1"]);
    with_export(&mut s, "ea", "a", &["w0"], false);
    let before = s.clone();
    apply_moves(
        &mut s,
        &[
            MovedQueue {
                export: "ea".into(),
                queue: 5,
                from: "w0".into(),
                to: "w1".into(),
            },
            MovedQueue {
                export: "gone".into(),
                queue: 0,
                from: "w0".into(),
                to: "w1".into(),
            },
        ],
    );
    assert_eq!(s, before);
}
