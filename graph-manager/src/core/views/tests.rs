use super::*;
use crate::core::fixtures::{null, state, throttle, with_export, MIB};

#[test]
fn a_plan_carries_the_subtree_and_each_queue_s_worker_socket() {
    let mut s = state(
        vec![null("a", MIB), throttle("t", "a", 10, ""), null("b", MIB)],
        &["w0", "w1"],
    );
    with_export(&mut s, "e", "t", &["w0", "w1", "gone"], true);
    let plan = export_plan(&s, &s.exports["e"]).unwrap();
    let nodes: Vec<&str> = plan.nodes.iter().map(|n| n.name.as_str()).collect();
    assert!(nodes.contains(&"t") && nodes.contains(&"a") && !nodes.contains(&"b"));
    let sockets: Vec<(&str, &str)> = plan
        .queues
        .iter()
        .map(|q| (q.worker.as_str(), q.worker_socket.as_str()))
        .collect();
    assert_eq!(
        sockets,
        vec![
            ("w0", "/run/blkmesh/w0.sock"),
            ("w1", "/run/blkmesh/w1.sock"),
            // A worker the state does not know: no socket.
            ("gone", ""),
        ]
    );
    assert_eq!(plan.generation, 1);
}

#[test]
fn a_node_shows_its_users_and_exports() {
    let mut s = state(vec![null("a", MIB), throttle("t", "a", 10, "")], &["w0"]);
    with_export(&mut s, "e", "t", &["w0"], false);
    let info = node_info(&s, s.graph.get("a").unwrap());
    assert_eq!(info.used_by, vec!["t"]);
    assert_eq!(info.size, MIB);
    let info = node_info(&s, s.graph.get("t").unwrap());
    assert_eq!(info.used_by, vec!["e"]);
    assert!(!info.read_only);
    assert!(info.zones.is_none());
}
