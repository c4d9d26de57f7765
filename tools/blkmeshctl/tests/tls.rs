//! End-to-end: the real `blkmesh-manager` binary serving TLS (certificates
//! made here with rcgen) and requiring a bearer token, driven by the real
//! `blkmeshctl` binary. Build the manager first: `cargo build --bins`.

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

const WAIT: Duration = Duration::from_secs(20);
const TOKEN: &str = "ctl-test-token";

fn manager_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary is in target/<profile>/deps");
    let bin = profile_dir.join("blkmesh-manager");
    assert!(
        bin.is_file(),
        "blkmesh-manager binary not found at {}; build it first with `cargo build --bins`",
        bin.display()
    );
    bin
}

/// A manager process, killed on drop.
struct ManagerProc {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    url: String,
}

impl ManagerProc {
    fn start(state_dir: &Path, extra: &[&std::ffi::OsStr]) -> ManagerProc {
        let mut child = Command::new(manager_binary())
            .args(["--listen", "127.0.0.1:0", "--state-dir"])
            .arg(state_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn blkmesh-manager");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WAIT).expect("manager address");
        let addr = line
            .trim()
            .strip_prefix("blkmesh-manager listening on ")
            .unwrap_or_else(|| panic!("unexpected line from blkmesh-manager: {line:?}"))
            .to_string();
        ManagerProc {
            child,
            url: format!("https://{addr}"),
        }
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl(args: &[&std::ffi::OsStr]) -> Output {
    let child = Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
        .args(args)
        .env_remove("BLKMESH_ADDR")
        .env_remove("BLKMESH_TOKEN_FILE")
        .env_remove("BLKMESH_MANAGER_CA")
        .env_remove("BLKMESH_CLIENT_CERT")
        .env_remove("BLKMESH_CLIENT_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn blkmeshctl");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(WAIT) {
        Ok(out) => out.expect("wait for blkmeshctl"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("blkmeshctl {args:?} timed out");
        }
    }
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[track_caller]
fn ok(args: &[&std::ffi::OsStr]) -> String {
    let o = ctl(args);
    assert_eq!(
        o.status.code(),
        Some(0),
        "blkmeshctl {args:?}: {}",
        text(&o)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[track_caller]
fn fails(args: &[&std::ffi::OsStr], needle: &str) {
    let o = ctl(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        o.status.code(),
        Some(1),
        "blkmeshctl {args:?}: {}",
        text(&o)
    );
    assert!(
        err.contains(needle),
        "blkmeshctl {args:?}: {err:?} lacks {needle:?}"
    );
}

fn write(dir: &Path, name: &str, data: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$(std::ffi::OsStr::new($a)),*] };
}

#[test]
fn blkmeshctl_over_tls_with_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A self-signed server certificate: its own CA.
    let server =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();
    let cert = write(d, "server.pem", &server.cert.pem());
    let key = write(d, "server.key", &server.signing_key.serialize_pem());
    let other = write(d, "other-ca.pem", &ca("unrelated").as_ref().pem());
    let token = write(d, "token", &format!("{TOKEN}\n"));
    let wrong_token = write(d, "wrong-token", "nope\n");

    let m = ManagerProc::start(
        &d.join("state"),
        args![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--token-file",
            &token
        ],
    );
    let url = m.url.as_str();
    let (c, t) = (cert.as_os_str(), token.as_os_str());

    // Everything right: health, a change, a listing.
    assert_eq!(
        ok(args!["--addr", url, "--ca", c, "--token-file", t, "health"]).trim(),
        "SERVING"
    );
    ok(args![
        "--addr",
        url,
        "--ca",
        c,
        "--token-file",
        t,
        "node",
        "add-null",
        "n0",
        "--size",
        "1M"
    ]);
    let list = ok(args![
        "--addr",
        url,
        "--ca",
        c,
        "--token-file",
        t,
        "--json",
        "node",
        "list"
    ]);
    assert!(list.contains("\"n0\""), "{list}");
    // The environment works as well as the flags.
    let o = Command::new(env!("CARGO_BIN_EXE_blkmeshctl"))
        .args(["--addr", url, "node", "list"])
        .env("BLKMESH_MANAGER_CA", &cert)
        .env("BLKMESH_TOKEN_FILE", &token)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));

    // Health needs no token (probes).
    assert_eq!(
        ok(args!["--addr", url, "--ca", c, "health"]).trim(),
        "SERVING"
    );
    // No token, a wrong token.
    fails(
        args!["--addr", url, "--ca", c, "node", "list"],
        "UNAUTHENTICATED: missing \"authorization: Bearer <token>\"",
    );
    fails(
        args![
            "--addr",
            url,
            "--ca",
            c,
            "--token-file",
            &wrong_token,
            "node",
            "list"
        ],
        "UNAUTHENTICATED: invalid bearer token",
    );
    // No CA, the wrong CA, plaintext.
    fails(
        args!["--addr", url, "--token-file", t, "node", "list"],
        "https:// needs the CA certificate",
    );
    fails(
        args![
            "--addr",
            url,
            "--ca",
            &other,
            "--token-file",
            t,
            "node",
            "list"
        ],
        "the manager's certificate is not signed by the CA certificate in",
    );
    let plain = url.replace("https://", "http://");
    let o = ctl(args!["--addr", &plain, "--token-file", t, "node", "list"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    fails(
        args!["--addr", &plain, "--ca", c, "node", "list"],
        "use an https:// address for TLS",
    );
    // A missing token file is a usage problem, named as such.
    fails(
        args![
            "--addr",
            url,
            "--ca",
            c,
            "--token-file",
            &d.join("nope"),
            "node",
            "list"
        ],
        "INVALID_ARGUMENT: cannot read token file",
    );
}

#[test]
fn blkmeshctl_with_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = ca("test CA");
    let server_key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .unwrap()
        .signed_by(&server_key, &server_ca)
        .unwrap();
    let client_ca = ca("test client CA");
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(DnType::CommonName, "ctl");
    let client = params.signed_by(&client_key, &client_ca).unwrap();

    let ca_file = write(d, "ca.pem", &server_ca.as_ref().pem());
    let cert = write(d, "server.pem", &server.pem());
    let key = write(d, "server.key", &server_key.serialize_pem());
    let client_ca_file = write(d, "client-ca.pem", &client_ca.as_ref().pem());
    let client_cert = write(d, "client.pem", &client.pem());
    let client_key_file = write(d, "client.key", &client_key.serialize_pem());

    let m = ManagerProc::start(
        &d.join("state"),
        args![
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &client_ca_file
        ],
    );
    let url = m.url.as_str();
    let out = ok(args![
        "--addr",
        url,
        "--ca",
        &ca_file,
        "--cert",
        &client_cert,
        "--key",
        &client_key_file,
        "worker",
        "list"
    ]);
    assert!(out.is_empty() || !out.contains("error"), "{out}");
    fails(
        args!["--addr", url, "--ca", &ca_file, "worker", "list"],
        "client certificate",
    );
    // --cert without --key is a usage error (clap: exit 2).
    let o = ctl(args![
        "--addr",
        url,
        "--ca",
        &ca_file,
        "--cert",
        &client_cert,
        "worker",
        "list"
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
