//! Reaching the manager: its address, the TLS and token options clients
//! need, the gRPC client, and the command-line tools.

use std::ffi::{OsStr, OsString};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Output;

use blkmesh_proto::client::ClientConfig;

use super::Cluster;
use crate::client::BlockingClient;
use crate::tool;

impl Cluster {
    /// The manager's TCP address.
    pub fn manager_addr(&self) -> SocketAddr {
        self.manager_addr
            .unwrap_or_else(|| panic!("blkmesh-testkit: the manager has not started"))
    }

    /// `http://ADDR` of the manager (`https://ADDR` with TLS).
    pub fn manager_url(&self) -> String {
        let scheme = if self.opts.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.manager_addr())
    }

    /// `<dir>/token`, the bearer token file, when the cluster has a token.
    pub fn token_file(&self) -> Option<PathBuf> {
        self.opts.token.as_ref().map(|_| self.dir().join("token"))
    }

    /// How to reach the manager with the cluster's TLS and token options.
    pub fn client_config(&self) -> ClientConfig {
        ClientConfig {
            url: self.manager_url(),
            ca_file: self.tls_ca(),
            cert_file: self.opts.client_cert.clone(),
            key_file: self.opts.client_key.clone(),
            token_file: self.token_file(),
            ..ClientConfig::default()
        }
    }

    fn tls_ca(&self) -> Option<PathBuf> {
        self.opts
            .tls_ca
            .clone()
            .or_else(|| self.opts.tls_cert.clone())
    }

    /// `--manager-ca`, `--manager-cert`/`--manager-key` and `--token-file`
    /// for the workers and the frontend.
    pub(super) fn client_args(&self) -> Vec<OsString> {
        let mut v: Vec<OsString> = Vec::new();
        if let (Some(_), Some(ca)) = (&self.opts.tls_cert, self.tls_ca()) {
            v.extend(["--manager-ca".into(), ca.into()]);
        }
        if let (Some(cert), Some(key)) = (&self.opts.client_cert, &self.opts.client_key) {
            v.extend([
                "--manager-cert".into(),
                cert.into(),
                "--manager-key".into(),
                key.into(),
            ]);
        }
        if let Some(t) = self.token_file() {
            v.extend(["--token-file".into(), t.into()]);
        }
        v
    }

    /// The blocking gRPC client (reconnected by each manager start).
    pub fn client(&self) -> &BlockingClient {
        self.client.as_ref().unwrap_or_else(|| {
            panic!("blkmesh-testkit: the manager is not running (start_manager() first)")
        })
    }

    /// Runs a workspace binary (e.g. `blkmesh-io`) to completion, killing
    /// it after [`tool::DEFAULT_TOOL_TIMEOUT`]; see [`tool::run_tool`].
    pub fn run_tool<I, S>(&self, bin: &str, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        tool::run_tool(bin, args)
    }

    /// Runs `blkmeshctl --addr <manager> ARGS…` (with `--ca`, `--cert`,
    /// `--key` and `--token-file` when the cluster has them).
    pub fn ctl<I, S>(&self, args: I) -> Output
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let url = self.manager_url();
        let mut all: Vec<std::ffi::OsString> = vec!["--addr".into(), url.into()];
        if let (Some(_), Some(ca)) = (&self.opts.tls_cert, self.tls_ca()) {
            all.extend(["--ca".into(), ca.into()]);
        }
        if let (Some(cert), Some(key)) = (&self.opts.client_cert, &self.opts.client_key) {
            all.extend(["--cert".into(), cert.into(), "--key".into(), key.into()]);
        }
        if let Some(t) = self.token_file() {
            all.extend(["--token-file".into(), t.into()]);
        }
        all.extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        tool::run_tool("blkmeshctl", all)
    }
}
