//! Throwaway certificates for the TLS tests (rcgen).

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// PEM files in a directory.
#[allow(dead_code)]
pub struct Pki {
    /// CA that signed `cert`.
    pub ca: PathBuf,
    /// Server certificate for 127.0.0.1 and localhost, and its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A self-signed server certificate (its own CA) and its key.
    pub self_signed: PathBuf,
    pub self_signed_key: PathBuf,
    /// CA of the client certificates, and a client certificate it signed.
    pub client_ca: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// Creates every file in `dir`.
pub fn make(dir: &Path) -> Pki {
    let server_ca = ca("blkmesh test CA");
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &server_ca).unwrap();

    let ss =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".to_string()])
            .unwrap();

    let client_ca = ca("blkmesh test client CA");
    let client_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "blkmesh test client");
    let client_cert = params.signed_by(&client_key, &client_ca).unwrap();

    let other = ca("unrelated CA");
    Pki {
        ca: write(dir, "ca.pem", &server_ca.as_ref().pem()),
        cert: write(dir, "server.pem", &cert.pem()),
        key: write(dir, "server.key", &key.serialize_pem()),
        self_signed: write(dir, "self.pem", &ss.cert.pem()),
        self_signed_key: write(dir, "self.key", &ss.signing_key.serialize_pem()),
        client_ca: write(dir, "client-ca.pem", &client_ca.as_ref().pem()),
        client_cert: write(dir, "client.pem", &client_cert.pem()),
        client_key: write(dir, "client.key", &client_key.serialize_pem()),
        other_ca: write(dir, "other-ca.pem", &other.as_ref().pem()),
    }
}
