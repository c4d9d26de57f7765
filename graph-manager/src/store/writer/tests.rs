use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::core::state::WorkerRecord;

fn with_worker(name: &str, pid: u32) -> State {
    let mut state = State::default();
    state.workers.insert(
        name.to_string(),
        WorkerRecord {
            socket: format!("/run/{name}.sock"),
            pid,
        },
    );
    state
}

#[tokio::test]
async fn a_write_is_on_disk_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file::STATE_FILE);
    let store = Store::new(path.clone());
    let ticket = store.begin().await;
    let state = with_worker("w0", 7);
    let back = store.write(&ticket, state.clone()).await.unwrap();
    assert_eq!(back, state);
    assert_eq!(file::load(&path).unwrap(), state);
}

#[tokio::test]
async fn a_failed_write_is_a_persist_error_and_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file::STATE_FILE);
    let store = Store::new(path.clone());
    let ticket = store.begin().await;
    let old = with_worker("w0", 7);
    store.write(&ticket, old.clone()).await.unwrap();
    // A directory where the temporary file goes: the write cannot start.
    let tmp = dir
        .path()
        .join(format!(".{}.tmp.{}", file::STATE_FILE, std::process::id()));
    std::fs::create_dir(&tmp).unwrap();
    let err = store
        .write(&ticket, with_worker("w1", 8))
        .await
        .unwrap_err();
    assert!(matches!(err, ApiError::Persist { .. }), "{err:?}");
    assert_eq!(file::load(&path).unwrap(), old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_served_one_at_a_time_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file::STATE_FILE);
    let store = Arc::new(Store::new(path.clone()));
    let first = store.begin().await;
    // Queued behind `first`, in this order.
    let mut waiting = Vec::new();
    for pid in 1..=3u32 {
        let store = Arc::clone(&store);
        let (queued_tx, queued_rx) = tokio::sync::oneshot::channel();
        waiting.push(tokio::spawn(async move {
            let ticket = {
                let turn = store.begin();
                tokio::pin!(turn);
                // Polled once so that it queues now, then awaited.
                let ready = futures_poll_once(&mut turn).await;
                let _ = queued_tx.send(());
                match ready {
                    Some(t) => t,
                    None => turn.await,
                }
            };
            let state = with_worker("w", pid);
            store.write(&ticket, state).await.unwrap();
            file::load(store_path(&store)).unwrap().workers["w"].pid
        }));
        queued_rx.await.unwrap();
    }
    // Nobody gets in while the first ticket is held.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!path.exists());
    drop(first);
    let mut seen = Vec::new();
    for task in waiting {
        seen.push(task.await.unwrap());
    }
    // Each change saw the file it wrote, and the last one stays.
    assert_eq!(seen, vec![1, 2, 3]);
    assert_eq!(file::load(&path).unwrap().workers["w"].pid, 3);
}

fn store_path(store: &Store) -> &std::path::Path {
    &store.path
}

/// Polls `fut` once: its output if it is ready.
async fn futures_poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(match std::pin::Pin::new(&mut *fut).poll(cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        })
    })
    .await
}
