use super::*;
use crate::core::fixtures::{null, state, with_export, MIB};

fn report(frontend: &str, generation: u64, state: ExportState) -> Report {
    Report {
        frontend: frontend.into(),
        generation,
        state,
        message: format!("{state:?}"),
        size: 4096,
    }
}

#[test]
fn an_export_is_pending_until_a_connected_frontend_reports_its_generation() {
    let mut s = state(vec![null("a", MIB)], &["w0"]);
    with_export(&mut s, "e", "a", &["w0"], false);
    let rec = &s.exports["e"];
    let mut sessions = Sessions::new(s.workers.keys().cloned());
    assert_eq!(
        sessions.export_state(rec),
        (ExportState::Pending, "no frontend connected".to_string())
    );
    let (tx, _rx) = mpsc::unbounded_channel();
    let session = sessions.new_session();
    sessions.frontends.insert(
        "f0".into(),
        FrontendConn {
            session,
            tx: Some(tx),
        },
    );
    assert!(sessions.frontend_live("f0"));
    assert!(sessions.export_state(rec).1.contains("generation 1"));
    // A report on another generation does not count.
    sessions.export_rt.entry("e".into()).or_default().report =
        Some(report("f0", 2, ExportState::Serving));
    assert_eq!(sessions.export_state(rec).0, ExportState::Pending);
    assert!(sessions.serving_report(rec).is_none());
    sessions.export_rt.entry("e".into()).or_default().report =
        Some(report("f0", 1, ExportState::VmmRefused));
    assert_eq!(sessions.export_state(rec).0, ExportState::VmmRefused);
    // A refused VMM still means the graph is open and served.
    assert_eq!(sessions.serving_report(rec).map(|r| r.size), Some(4096));
    // Its frontend gone: not served any more.
    if let Some(conn) = sessions.frontends.get_mut("f0") {
        conn.tx = None;
    }
    assert!(!sessions.frontend_live("f0"));
    assert!(sessions.serving_report(rec).is_none());
}

#[test]
fn known_workers_start_gone_and_sessions_start_at_one() {
    let mut sessions = Sessions::new(["w0".to_string()]);
    assert_eq!(sessions.gone_since.get("w0"), Some(&0));
    assert_eq!(sessions.new_session(), 1);
    assert_eq!(sessions.new_session(), 2);
}

#[test]
fn a_broadcast_reaches_the_connected_frontends_only() {
    let mut sessions = Sessions::new([]);
    let (tx0, mut rx0) = mpsc::unbounded_channel();
    let (tx1, mut rx1) = mpsc::unbounded_channel::<ToFrontend>();
    sessions.frontends.insert(
        "f0".into(),
        FrontendConn {
            session: 1,
            tx: Some(tx0),
        },
    );
    sessions.frontends.insert(
        "f1".into(),
        FrontendConn {
            session: 2,
            tx: None,
        },
    );
    drop(tx1);
    sessions.broadcast(FrontendMsg::Remove("e".into()));
    let got = rx0.try_recv().unwrap();
    assert!(matches!(got, ToFrontend::Send(FrontendMsg::Remove(id)) if id == "e"));
    assert!(rx1.try_recv().is_err());
}
