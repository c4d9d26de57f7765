use blkmesh_proto::v1::RawOptions;

use super::*;
use crate::core::fixtures::{null, state, throttle, with_export, MIB};

#[test]
fn new_limits_of_a_grouped_throttle_reach_the_whole_group() {
    let s = state(
        vec![
            null("a", MIB),
            null("b", MIB),
            null("c", MIB),
            throttle("ta", "a", 100, "g"),
            throttle("tb", "b", 100, "g"),
            throttle("tc", "c", 100, ""),
        ],
        &[],
    );
    let updated = throttle("ta", "a", 500, "g");
    let members = group_members_with(&s, &updated);
    assert_eq!(members.len(), 1);
    let (before, after) = &members[0];
    assert_eq!(before.name, "tb");
    assert_eq!(after, &throttle("tb", "b", 500, "g"));
    assert!(group_change(&updated).contains("via node \"ta\""));
    // Alone, or not a throttle: nobody else.
    assert!(group_members_with(&s, &throttle("tc", "c", 500, "")).is_empty());
    assert!(group_members_with(&s, &null("a", 2 * MIB)).is_empty());
}

#[test]
fn generations_of_the_named_exports_go_up_by_one() {
    let mut s = state(vec![null("a", MIB), null("b", MIB)], &["w0"]);
    with_export(&mut s, "ea", "a", &["w0"], false);
    with_export(&mut s, "eb", "b", &["w0"], false);
    let targets = bump_generations(&mut s, &["ea".to_string(), "gone".to_string()]);
    assert_eq!(targets, vec![("ea".to_string(), 2)]);
    assert_eq!(s.exports["ea"].generation, 2);
    assert_eq!(s.exports["eb"].generation, 1);
}

#[test]
fn a_new_node_takes_its_size_from_its_driver_or_child() {
    let s = state(vec![null("a", 4 * MIB)], &[]);
    assert_eq!(new_node_size(&s, &null("n", MIB), None).unwrap(), MIB);
    assert_eq!(
        new_node_size(&s, &throttle("t", "a", 1, ""), None).unwrap(),
        4 * MIB
    );
    let raw = |size| NodeSpec {
        name: "r".into(),
        driver: Some(Driver::Raw(RawOptions {
            child: "a".into(),
            offset: MIB,
            size,
        })),
    };
    // 0: the rest of the child after the offset.
    assert_eq!(new_node_size(&s, &raw(0), None).unwrap(), 3 * MIB);
    assert_eq!(new_node_size(&s, &raw(MIB), None).unwrap(), MIB);
    assert!(new_node_size(&s, &raw(8 * MIB), None).is_err());
    let none = NodeSpec {
        name: "x".into(),
        driver: None,
    };
    assert!(matches!(
        new_node_size(&s, &none, None),
        Err(ApiError::Missing("node.driver"))
    ));
}
