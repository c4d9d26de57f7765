//! End-to-end with the real processes: a manager serving TLS and requiring
//! a bearer token; workers and the frontend register, report and push
//! statistics through it; blkmeshctl and blkmesh-io work as usual. Build the
//! binaries first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::{ExportState, GetStatsRequest, GetStatsResponse};
use blkmesh_testkit::{bin_path, run_tool, Cluster, ClusterOptions, ExportOpts, WorkerState};

const TOKEN: &str = "cluster-Token.1";

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Writes and reads back through the export, as a guest would.
fn io(socket: &std::path::Path) {
    let out = run_tool(
        "blkmesh-io",
        [
            "--socket",
            socket.to_str().unwrap(),
            "--queues",
            "2",
            "-c",
            "write -P 0xc3 0 256k",
            "-c",
            "read -P 0xc3 0 256k",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
}

fn get_stats(cluster: &Cluster) -> GetStatsResponse {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let config = cluster.client_config();
    rt.block_on(async move {
        let ch = config.connect().await.unwrap();
        StatsServiceClient::new(ch)
            .get_stats(GetStatsRequest::default())
            .await
            .unwrap()
            .into_inner()
    })
}

/// Waits until the frontend reports the export SERVING (its agent session
/// goes through TLS and the token) and both stats reporters have
/// counted the writes.
fn wait_serving_and_counted(cluster: &Cluster, id: &str, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let serving =
            cluster.list_exports().unwrap().iter().any(|e| {
                e.export.as_ref().unwrap().id == id && e.state == ExportState::Serving as i32
            });
        let stats = get_stats(cluster);
        let writes = |io: Option<&blkmesh_proto::v1::IoStats>| {
            io.and_then(|io| io.write.as_ref()).map_or(0, |w| w.ops)
        };
        let frontend = stats
            .exports
            .iter()
            .find(|e| e.export == id)
            .map_or(0, |e| writes(e.io.as_ref()));
        let worker = stats
            .nodes
            .iter()
            .find(|n| n.node == node)
            .map_or(0, |n| writes(n.io.as_ref()));
        if serving && frontend > 0 && worker > 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "serving {serving}, frontend writes {frontend}, worker writes {worker}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs a worker with `args` (after its name, socket and manager) for a
/// moment and returns its output; it is killed if it is still running.
fn stray_worker(cluster: &Cluster, name: &str, args: &[&std::ffi::OsStr]) -> Output {
    let mut child = Command::new(bin_path("blkmesh-worker"))
        .arg("--name")
        .arg(name)
        .arg("--socket")
        .arg(cluster.run_dir().join(format!("{name}.sock")))
        .arg("--manager")
        .arg(cluster.manager_url())
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("BLKMESH_TOKEN_FILE")
        .env_remove("BLKMESH_MANAGER_CA")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

#[test]
fn processes_register_and_serve_over_mutual_tls_with_a_token() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(pki_dir.path());
    let cluster = Cluster::start(
        ClusterOptions::default()
            .workers(2)
            .tls(&pki.cert, &pki.key, &pki.ca)
            .mutual_tls(&pki.client_ca, &pki.client_cert, &pki.client_key)
            .token(TOKEN),
    );
    assert!(cluster.manager_url().starts_with("https://"));
    // Both workers registered (Cluster::start waits for them).
    cluster
        .add_io_uring("d", &cluster.sparse_image("d.img", 16 << 20), false, false)
        .unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("d", "d").writable().queues(2).spread())
        .unwrap();
    io(&socket);
    wait_serving_and_counted(&cluster, "d", "d");

    let out = cluster.ctl(["--json", "worker", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("worker1"));

    // A worker with the wrong token is turned away and never goes ALIVE.
    let wrong = pki_dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let out = stray_worker(
        &cluster,
        "intruder",
        &[
            "--manager-ca".as_ref(),
            pki.ca.as_os_str(),
            "--manager-cert".as_ref(),
            pki.client_cert.as_os_str(),
            "--manager-key".as_ref(),
            pki.client_key.as_os_str(),
            "--token-file".as_ref(),
            wrong.as_os_str(),
        ],
    );
    let log = text(&out);
    assert!(log.contains("invalid bearer token"), "{log}");
    // One without the CA refuses to start, saying why.
    let out = stray_worker(
        &cluster,
        "intruder2",
        &["--token-file".as_ref(), wrong.as_os_str()],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(
        text(&out).contains("https:// needs the CA certificate"),
        "{}",
        text(&out)
    );
    let workers = cluster.list_workers().unwrap();
    assert!(
        workers.iter().all(|w| !w.name.starts_with("intruder")),
        "{workers:?}"
    );
}

#[test]
fn processes_work_with_a_self_signed_certificate_and_a_token() {
    let pki_dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(pki_dir.path());
    let mut cluster = Cluster::start(
        ClusterOptions::default()
            .workers(1)
            .tls(&pki.self_signed, &pki.self_signed_key, &pki.self_signed)
            .token(TOKEN),
    );
    let image = cluster.sparse_image("n.img", 16 << 20);
    cluster.add_io_uring("n", &image, false, false).unwrap();
    let socket = cluster
        .add_export(ExportOpts::new("n", "n").writable().queues(2))
        .unwrap();
    io(&socket);
    wait_serving_and_counted(&cluster, "n", "n");
    let out = cluster.ctl(["health"]);
    assert!(out.status.success(), "{}", text(&out));

    // The processes find the manager again after it restarts.
    cluster.restart_manager();
    cluster
        .wait_workers(&["worker0"], WorkerState::Alive, Duration::from_secs(10))
        .unwrap();
    io(&socket);
}
