use super::*;

#[test]
fn timers_come_due_in_time_order() {
    let mut w = Waiting::new(0);
    assert!(w.is_empty());
    w.hold_until(30, 3);
    w.hold_until(10, 1);
    w.hold_until(20, 2);
    assert_eq!(w.next_deadline(), Some(10));
    assert_eq!(w.pop_due(5), None);
    assert_eq!(w.pop_due(20), Some(1));
    assert_eq!(w.pop_due(20), Some(2));
    assert_eq!(w.pop_due(20), None);
    assert_eq!(w.next_deadline(), Some(30));
    assert_eq!(w.drain(), vec![3]);
    assert!(w.is_empty());
}

#[test]
fn a_throttle_keeps_its_order_and_its_head_decides_when() {
    let mut w = Waiting::new(2);
    w.throttle(1, 100, 7);
    // Later arrivals do not move the head's retry time.
    w.throttle(1, 50, 8);
    assert_eq!(w.next_deadline(), Some(100));
    assert_eq!(w.throttled_due(1, 99), None);
    assert_eq!(w.throttled_due(1, 100), Some(7));
    w.admitted(1);
    assert_eq!(w.throttled_due(1, 100), Some(8));
    w.retry_throttled_at(1, 200);
    assert_eq!(w.throttled_due(1, 100), None);
    assert_eq!(w.next_deadline(), Some(200));
    assert_eq!(w.throttled_due(0, u64::MAX), None, "another stage");
    w.hold_until(150, 9);
    let mut all = w.drain();
    all.sort_unstable();
    assert_eq!(all, vec![8, 9]);
    assert!(w.is_empty());
}
