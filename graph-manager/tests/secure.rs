//! TLS and bearer tokens (in-process manager, clients through
//! `blkmesh_proto::client`).

#![allow(
    clippy::unwrap_used,
    reason = "a test: a failed unwrap is a failed test"
)]

mod common;
use common::agent::WorkerSession;

use std::path::Path;
use std::time::Duration;

use blkmesh_manager::{Manager, ManagerConfig, ManagerError, RunningManager};
use blkmesh_proto::agent::v1::agent_service_client::AgentServiceClient;
use blkmesh_proto::agent::v1::WorkerHello;
use blkmesh_proto::client::{ClientConfig, ClientError, ManagerChannel};
use blkmesh_proto::v1::node_service_client::NodeServiceClient;
use blkmesh_proto::v1::stats_service_client::StatsServiceClient;
use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
use blkmesh_proto::v1::zone_service_client::ZoneServiceClient;
use blkmesh_proto::v1::{
    ListNodesRequest, ListWorkersRequest, ReportZonesRequest, WatchEventsRequest,
};
use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const TOKEN: &str = "s3cret-Token_42";

fn config(dir: &Path) -> ManagerConfig {
    ManagerConfig::new(dir.join("state")).with_listen("127.0.0.1:0".parse().unwrap())
}

async fn start(config: ManagerConfig) -> RunningManager {
    Manager::bind(config).await.unwrap().spawn()
}

async fn list_nodes(ch: ManagerChannel) -> Result<usize, tonic::Status> {
    NodeServiceClient::new(ch)
        .list_nodes(ListNodesRequest {})
        .await
        .map(|r| r.into_inner().nodes.len())
}

async fn plain(url: &str) -> Channel {
    Channel::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[track_caller]
fn unauthenticated<T: std::fmt::Debug>(r: Result<T, tonic::Status>, needle: &str) {
    match r {
        Ok(v) => panic!("expected UNAUTHENTICATED, got Ok({v:?})"),
        Err(s) => {
            assert_eq!(s.code(), Code::Unauthenticated, "{}", s.message());
            assert!(
                s.message().contains(needle),
                "{:?} lacks {needle:?}",
                s.message()
            );
        }
    }
}

#[tokio::test]
async fn token_is_required_on_every_service_but_health() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let m = start(config(dir.path()).with_token_file(token_file.clone())).await;
    let url = m.url();

    // No token.
    let ch = plain(&url).await;
    unauthenticated(
        NodeServiceClient::new(ch.clone())
            .list_nodes(ListNodesRequest {})
            .await,
        "requires a token",
    );
    unauthenticated(
        WorkerServiceClient::new(ch.clone())
            .list_workers(ListWorkersRequest {})
            .await,
        "requires a token",
    );
    // Agent sessions too: no worker can register without it.
    unauthenticated(
        WorkerSession::open(
            &mut AgentServiceClient::new(ch.clone()),
            WorkerHello {
                name: "w0".into(),
                socket: "/tmp/w0.sock".into(),
                pid: 1,
            },
        )
        .await
        .map(|_| ()),
        "requires a token",
    );
    unauthenticated(
        StatsServiceClient::new(ch.clone())
            .watch_events(WatchEventsRequest {})
            .await
            .map(|_| ()),
        "requires a token",
    );
    unauthenticated(
        ZoneServiceClient::new(ch.clone())
            .report_zones(ReportZonesRequest {
                export: "e0".into(),
                ..Default::default()
            })
            .await,
        "requires a token",
    );
    // Health stays open for probes.
    let health = HealthClient::new(ch)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(health.status, 1, "SERVING");

    // A wrong token, and a wrong scheme.
    let wrong = ClientConfig::new(url.clone())
        .with_token("s3cret-Token_43")
        .connect()
        .await
        .unwrap();
    unauthenticated(list_nodes(wrong).await, "invalid bearer token");
    let short = ClientConfig::new(url.clone())
        .with_token("s3cret")
        .connect()
        .await
        .unwrap();
    unauthenticated(list_nodes(short).await, "invalid bearer token");
    let mut basic =
        NodeServiceClient::with_interceptor(plain(&url).await, |mut r: tonic::Request<()>| {
            r.metadata_mut()
                .insert("authorization", format!("Basic {TOKEN}").parse().unwrap());
            Ok(r)
        });
    unauthenticated(
        basic.list_nodes(ListNodesRequest {}).await,
        "must be \"Bearer <token>\"",
    );

    // The right one, inline or from the file.
    let ok = ClientConfig::new(url.clone())
        .with_token(TOKEN)
        .connect()
        .await
        .unwrap();
    assert_eq!(list_nodes(ok.clone()).await.unwrap(), 0);
    // Past the token check, the zone service answers for itself.
    let r = ZoneServiceClient::new(ok)
        .report_zones(ReportZonesRequest {
            export: "e0".into(),
            ..Default::default()
        })
        .await;
    assert_eq!(r.unwrap_err().code(), Code::NotFound);
    let ok = ClientConfig::new(url.clone())
        .with_token_file(&token_file)
        .connect()
        .await
        .unwrap();
    let _worker = WorkerSession::open(
        &mut AgentServiceClient::new(ok),
        WorkerHello {
            name: "w0".into(),
            socket: "/tmp/w0.sock".into(),
            pid: 1,
        },
    )
    .await
    .unwrap();
    m.stop().await.unwrap();
}

#[tokio::test]
async fn the_unix_socket_needs_the_token_too() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("m.sock");
    let m = start(config(dir.path()).with_unix(sock.clone()).with_token(TOKEN)).await;
    let url = format!("unix:{}", sock.display());
    let none = ClientConfig::new(url.clone()).connect().await.unwrap();
    unauthenticated(list_nodes(none).await, "requires a token");
    let ok = ClientConfig::new(url)
        .with_token(TOKEN)
        .connect()
        .await
        .unwrap();
    assert_eq!(list_nodes(ok).await.unwrap(), 0);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn tls_with_a_ca_signed_and_a_self_signed_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(dir.path());

    for (cert, key, ca) in [
        (&pki.cert, &pki.key, &pki.ca),
        (&pki.self_signed, &pki.self_signed_key, &pki.self_signed),
    ] {
        let state = tempfile::tempdir().unwrap();
        let m = start(config(state.path()).with_tls(cert.clone(), key.clone())).await;
        let url = m.url();
        assert!(url.starts_with("https://127.0.0.1:"), "{url}");

        // With the CA: works; by name too.
        let ch = ClientConfig::new(url.clone())
            .with_ca_file(ca)
            .connect()
            .await
            .unwrap();
        assert_eq!(list_nodes(ch).await.unwrap(), 0);
        let by_name = url.replace("127.0.0.1", "localhost");
        let ch = ClientConfig::new(by_name)
            .with_ca_file(ca)
            .connect()
            .await
            .unwrap();
        assert_eq!(list_nodes(ch).await.unwrap(), 0);

        // Without a CA: refused before connecting, saying what is missing.
        let e = ClientConfig::new(url.clone()).connect().await.unwrap_err();
        assert!(matches!(e, ClientError::TlsOptions { .. }), "{e}");
        assert!(e.to_string().contains("needs the CA certificate"), "{e}");

        // With a CA that did not sign it: the handshake fails, and says why.
        let e = ClientConfig::new(url.clone())
            .with_ca_file(&pki.other_ca)
            .connect()
            .await
            .unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("is not signed by the CA certificate in"),
            "{e}"
        );

        // A name the certificate does not carry.
        let e = ClientConfig::new(url.clone())
            .with_ca_file(ca)
            .with_tls_domain("manager.example")
            .connect()
            .await
            .unwrap_err();
        assert!(e.to_string().contains("does not name this host"), "{e}");

        // Plaintext against the TLS port gets nowhere.
        let plain_url = url.replace("https://", "http://");
        let r = match ClientConfig::new(plain_url)
            .with_timeout(Duration::from_secs(5))
            .connect()
            .await
        {
            Ok(ch) => list_nodes(ch).await.map_err(|s| s.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(r.is_err(), "plaintext call to a TLS manager succeeded");
        m.stop().await.unwrap();
    }
}

#[tokio::test]
async fn tls_client_to_a_plaintext_manager_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(dir.path());
    let m = start(config(dir.path())).await;
    let url = m.url().replace("http://", "https://");
    let e = ClientConfig::new(url)
        .with_ca_file(&pki.ca)
        .connect()
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("does not speak TLS on this port"),
        "{e}"
    );
    m.stop().await.unwrap();
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(dir.path());
    let m = start(
        config(dir.path())
            .with_tls(pki.cert.clone(), pki.key.clone())
            .with_client_ca(pki.client_ca.clone())
            .with_token(TOKEN),
    )
    .await;
    let url = m.url();

    // No client certificate: the handshake or the first call fails.
    let r = match ClientConfig::new(url.clone())
        .with_ca_file(&pki.ca)
        .with_token(TOKEN)
        .connect()
        .await
    {
        Ok(ch) => list_nodes(ch).await.map_err(|s| format!("{s:?}")),
        Err(e) => Err(e.to_string()),
    };
    let err = r.expect_err("a client without a certificate got through");
    assert!(err.contains("CertificateRequired"), "{err}");

    // A certificate from another CA: refused as well.
    let r = match ClientConfig::new(url.clone())
        .with_ca_file(&pki.ca)
        .with_client_identity(&pki.cert, &pki.key)
        .with_token(TOKEN)
        .connect()
        .await
    {
        Ok(ch) => list_nodes(ch).await.map_err(|s| format!("{s:?}")),
        Err(e) => Err(e.to_string()),
    };
    assert!(r.is_err(), "a certificate from the wrong CA got through");

    // The right certificate, but no token: TLS passes, the token check does not.
    let ch = ClientConfig::new(url.clone())
        .with_ca_file(&pki.ca)
        .with_client_identity(&pki.client_cert, &pki.client_key)
        .connect()
        .await
        .unwrap();
    unauthenticated(list_nodes(ch).await, "requires a token");

    // Everything right.
    let ch = ClientConfig::new(url)
        .with_ca_file(&pki.ca)
        .with_client_identity(&pki.client_cert, &pki.client_key)
        .with_token(TOKEN)
        .connect()
        .await
        .unwrap();
    assert_eq!(list_nodes(ch).await.unwrap(), 0);
    m.stop().await.unwrap();
}

#[tokio::test]
async fn bad_tls_or_token_files_stop_the_manager_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let pki = common::pki::make(dir.path());
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\nnope\n").unwrap();
    let empty = dir.path().join("empty");
    std::fs::write(&empty, "\n").unwrap();

    let e =
        Manager::bind(config(dir.path()).with_tls(dir.path().join("missing.pem"), pki.key.clone()))
            .await
            .unwrap_err();
    assert!(
        matches!(
            e,
            ManagerError::ReadTls {
                what: "certificate",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("missing.pem"), "{e}");

    let e = Manager::bind(config(dir.path()).with_tls(garbage.clone(), pki.key.clone()))
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::Tls(_)), "{e}");

    // A key that does not belong to the certificate... is rustls's call at
    // handshake time; a key that is no key at all is refused now.
    let e = Manager::bind(config(dir.path()).with_tls(pki.cert.clone(), garbage))
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::Tls(_)), "{e}");

    let e = Manager::bind(config(dir.path()).with_token_file(empty))
        .await
        .unwrap_err();
    assert!(matches!(e, ManagerError::Token(_)), "{e}");
    assert!(e.to_string().contains("is empty"), "{e}");

    let e = Manager::bind(config(dir.path()).with_token("has space"))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("without spaces"), "{e}");
}
