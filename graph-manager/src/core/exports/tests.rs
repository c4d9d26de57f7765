use super::*;
use crate::core::fixtures::{export, null, state, throttle, with_export, zoned, MIB};

fn refused(s: &State, e: &VhostUserBlkExport) -> String {
    check_new_export(s, e).unwrap_err().to_string()
}

#[test]
fn a_new_export_comes_back_normalized() {
    let s = state(vec![null("a", MIB)], &[]);
    let e = check_new_export(&s, &export("e", "a", 0, false)).unwrap();
    assert_eq!(
        (e.num_queues, e.queue_size, e.logical_block_size),
        (1, 256, 512)
    );
    assert_eq!(e.serial, "e");
}

#[test]
fn ids_sockets_and_nodes_are_taken_once() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0"]);
    with_export(&mut s, "ea", "a", &["w0"], false);
    assert!(refused(&s, &export("ea", "b", 1, false)).contains("already exists"));
    let mut same_socket = export("eb", "b", 1, false);
    same_socket.socket = s.exports["ea"].export.socket.clone();
    assert!(refused(&s, &same_socket).contains("already used by export \"ea\""));
    assert!(refused(&s, &export("eb", "a", 1, false)).contains("already exported by export \"ea\""));
    assert!(refused(&s, &export("eb", "nope", 1, false)).contains("not found"));
    assert!(check_new_export(&s, &export("eb", "b", 1, false)).is_ok());
}

#[test]
fn spread_queues_need_grouped_throttles_and_no_zoned_node() {
    let s = state(
        vec![
            null("a", MIB),
            throttle("alone", "a", 100, ""),
            null("b", MIB),
            throttle("shared", "b", 100, "tenant"),
            null("c", 8 * MIB),
            zoned("z", "c"),
        ],
        &[],
    );
    assert!(refused(&s, &export("e", "alone", 2, true)).contains("throttle without a group"));
    assert!(check_new_export(&s, &export("e", "alone", 2, false)).is_ok());
    assert!(check_new_export(&s, &export("e", "shared", 2, true)).is_ok());
    assert!(refused(&s, &export("e", "z", 2, true)).contains("is zoned"));
}

#[test]
fn waiting_exports_of_the_configuration_hold_their_id_socket_and_node() {
    let waiting = vec![blkmesh_graph::validate_export(&export("cfg", "a", 1, false)).unwrap()];
    let conflict =
        |e: &VhostUserBlkExport| check_waiting_conflict(&waiting, e).unwrap_err().to_string();
    assert!(conflict(&export("cfg", "b", 1, false)).contains("already exists"));
    let mut same_socket = export("other", "b", 1, false);
    same_socket.socket = waiting[0].socket.clone();
    assert!(conflict(&same_socket).contains("waiting for a worker"));
    assert!(conflict(&export("other", "a", 1, false)).contains("waiting for a worker"));
    assert!(check_waiting_conflict(&waiting, &export("other", "b", 1, false)).is_ok());
}
