use super::*;

/// A shared file as the VMM's memfd stands in.
fn memfd(size: u64) -> File {
    let f = tempfile::tempfile().unwrap();
    f.set_len(size).unwrap();
    f
}

fn marked(log: &DirtyLog, pages: u64) -> Vec<u64> {
    (0..pages).filter(|p| log.is_marked(p * LOG_PAGE)).collect()
}

#[test]
fn marks_every_page_a_range_touches_and_nothing_else() {
    let log = DirtyLog::map(memfd(4096), 0, 64).unwrap();
    assert_eq!(log.covers(), 64 * 8 * LOG_PAGE);
    log.mark(LOG_PAGE - 1, 2); // straddles pages 0 and 1
    log.mark(5 * LOG_PAGE, LOG_PAGE); // exactly page 5
    log.mark(7 * LOG_PAGE + 100, 20 * LOG_PAGE); // pages 7..=27, across bytes
    log.mark(40 * LOG_PAGE, 0); // nothing
    let mut want = vec![0, 1, 5];
    want.extend(7..=27);
    assert_eq!(marked(&log, 512), want);
}

#[test]
fn pages_past_the_log_are_ignored_and_offsets_are_honoured() {
    let file = memfd(8192);
    let log = DirtyLog::map(file.try_clone().unwrap(), 4096, 2).unwrap();
    log.mark(0, u64::MAX); // clipped, no overflow
    assert_eq!(marked(&log, 64), (0..16).collect::<Vec<_>>());
    // Written at the offset in the shared file, where the VMM reads it.
    let mut b = [0u8; 3];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut b, 4096).unwrap();
    assert_eq!(b, [0xff, 0xff, 0]);
    assert!(DirtyLog::map(memfd(4096), 0, 0).is_err());
    assert!(DirtyLog::map(memfd(4096), 0, MAX_LOG_SIZE + 1).is_err());
}

#[test]
fn a_sink_marks_only_while_logging_and_takes_a_new_log_live() {
    let sink = LogSink::default();
    assert!(sink.active().is_none());
    sink.set_log(DirtyLog::map(memfd(4096), 0, 8).unwrap());
    assert!(sink.active().is_none(), "LOG_ALL not acked yet");
    sink.set_logging(true);
    let first = sink.active().unwrap();
    first.mark(0, 1);
    sink.set_log(DirtyLog::map(memfd(4096), 0, 8).unwrap());
    let second = sink.active().unwrap();
    assert!(!Arc::ptr_eq(&first, &second));
    assert!(!second.is_marked(0));
    sink.set_logging(false);
    assert!(sink.active().is_none());
}

#[test]
fn the_tally_counts_what_was_asked_and_what_was_newly_marked() {
    let log = DirtyLog::map(memfd(4096), 0, 8).unwrap();
    log.mark(LOG_PAGE - 1, 2); // pages 0 and 1
    log.mark(100, 10); // page 0 again
    log.mark(1 << 40, LOG_PAGE); // past the log: nothing
    let t = log.tally();
    assert_eq!(t.bytes.load(Ordering::Relaxed), 12);
    assert_eq!(t.page_marks.load(Ordering::Relaxed), 3);
    assert_eq!(t.newly_marked.load(Ordering::Relaxed), 2);
}
