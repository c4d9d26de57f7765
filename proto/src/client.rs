//! Connecting to `blkmesh-manager`: the one place every client (frontend,
//! workers, `blkmeshctl`, the `blkmesh` supervisor, the test kit) sets up
//! its channel.
//!
//! A [`ClientConfig`] names the manager (`http://HOST:PORT`,
//! `https://HOST:PORT` or `unix:/PATH`) and optionally:
//!
//! - a CA certificate (PEM) to verify the manager's TLS certificate with
//!   (required for `https://`, refused for the others);
//! - a client certificate and key (PEM) for managers that ask for one
//!   (mutual TLS);
//! - a bearer token, given inline or as a file, sent as
//!   `authorization: Bearer <token>` with every call.
//!
//! [`ClientConfig::connect`] (or [`ClientConfig::connect_lazy`]) turns it
//! into a [`ManagerChannel`], which every generated client accepts:
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use blkmesh_proto::client::ClientConfig;
//! use blkmesh_proto::v1::worker_service_client::WorkerServiceClient;
//! let channel = ClientConfig::new("https://127.0.0.1:50051")
//!     .with_ca_file("/etc/blkmesh/ca.pem")
//!     .with_token_file("/etc/blkmesh/token")
//!     .connect()
//!     .await?;
//! let mut workers = WorkerServiceClient::new(channel);
//! # let _ = &mut workers; Ok(()) }
//! ```
//!
//! Binaries that pass the manager's address deep into library code set the
//! security part once, from their flags, with [`set_process_defaults`];
//! [`ClientConfig::for_process`] then gives a config for any address. Without
//! it, the environment decides ([`ClientConfig::from_env`]):
//! `BLKMESH_MANAGER_CA`, `BLKMESH_CLIENT_CERT`, `BLKMESH_CLIENT_KEY`,
//! `BLKMESH_TOKEN_FILE`. Nothing set means plaintext without a token.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, Uri};
use tonic::{Request, Status};

/// Environment variable: file holding the bearer token.
pub const TOKEN_FILE_ENV: &str = "BLKMESH_TOKEN_FILE";
/// Environment variable: CA certificate (PEM) that signed the manager's certificate.
pub const MANAGER_CA_ENV: &str = "BLKMESH_MANAGER_CA";
/// Environment variable: client certificate (PEM) for mutual TLS.
pub const CLIENT_CERT_ENV: &str = "BLKMESH_CLIENT_CERT";
/// Environment variable: the client certificate's private key (PEM).
pub const CLIENT_KEY_ENV: &str = "BLKMESH_CLIENT_KEY";

/// Longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Longest PEM file read, in bytes (certificate chains are a few KiB).
const MAX_PEM_LEN: u64 = 1 << 20;

/// The metadata key of the token.
pub const AUTHORIZATION: &str = "authorization";

/// A channel to the manager that adds the bearer token (if any) to every call.
pub type ManagerChannel = InterceptedService<Channel, BearerToken>;

/// A token file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The file could not be read.
    #[error("cannot read token file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file holds only whitespace.
    #[error("token file {} is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The token has characters a header cannot carry, or is too long.
    #[error("token{}: {reason}", origin(path))]
    Invalid {
        /// The file, when the token came from one.
        path: Option<PathBuf>,
        /// What is wrong.
        reason: String,
    },
}

fn origin(path: &Option<PathBuf>) -> String {
    match path {
        Some(p) => format!(" in {}", p.display()),
        None => String::new(),
    }
}

/// Checks that `token` can be sent as `Bearer <token>`: 1 to
/// [`MAX_TOKEN_LEN`] visible ASCII characters (no spaces).
pub fn validate_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("must not be empty".into());
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(format!(
            "is {} bytes long; at most {MAX_TOKEN_LEN}",
            token.len()
        ));
    }
    if let Some(pos) = token.bytes().position(|b| !b.is_ascii_graphic()) {
        return Err(format!(
            "must be visible ASCII characters without spaces (byte {pos} is not)"
        ));
    }
    Ok(())
}

/// Reads a token file: its content without surrounding whitespace (a
/// trailing newline is fine), checked with [`validate_token`].
pub fn load_token(path: &Path) -> Result<String, TokenError> {
    let bytes =
        read_limited(path, MAX_TOKEN_LEN as u64 + 4096).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8(bytes).map_err(|_| TokenError::Invalid {
        path: Some(path.to_path_buf()),
        reason: "is not UTF-8 text".into(),
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Empty {
            path: path.to_path_buf(),
        });
    }
    validate_token(token).map_err(|reason| TokenError::Invalid {
        path: Some(path.to_path_buf()),
        reason,
    })?;
    Ok(token.to_string())
}

/// Reads at most `limit` bytes of `path`; a longer file is an error.
fn read_limited(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    file.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(buf)
}

/// Why a connection to the manager could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The address is not one of the accepted forms.
    #[error("manager address {url:?}: {reason}")]
    Url {
        /// The address as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate or key file could not be read.
    #[error("cannot read {what} {}: {source}", path.display())]
    ReadFile {
        /// e.g. `CA certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The token cannot be used.
    #[error(transparent)]
    Token(#[from] TokenError),
    /// The TLS options do not fit together or with the address.
    #[error("manager address {url:?}: {reason}")]
    TlsOptions {
        /// The address.
        url: String,
        /// What does not fit.
        reason: String,
    },
    /// tonic refused the TLS configuration (e.g. a PEM file holds no certificate).
    #[error("manager address {url:?}: TLS setup failed: {reason}")]
    Tls {
        /// The address.
        url: String,
        /// tonic's error with its causes.
        reason: String,
    },
    /// The manager could not be reached or the TLS handshake failed.
    #[error("cannot connect to the manager at {url}: {reason}")]
    Connect {
        /// The address.
        url: String,
        /// The error with its causes, and a hint when the cause is known.
        reason: String,
    },
}

/// How to reach the manager; see the [module docs](self).
#[derive(Clone, Default)]
pub struct ClientConfig {
    /// `http://HOST:PORT`, `https://HOST:PORT` or `unix:/PATH`.
    pub url: String,
    /// CA certificate (PEM) to verify the manager with; needed for `https://`.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM), for managers that require one.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// File holding the bearer token (read at each connect).
    pub token_file: Option<PathBuf>,
    /// The bearer token itself; takes precedence over `token_file`.
    pub token: Option<String>,
    /// Name to check the manager's certificate against (default: the URL's host).
    pub tls_domain: Option<String>,
    /// Bound on establishing the connection (default: none).
    pub connect_timeout: Option<Duration>,
    /// Deadline of each call (default: none; streams need none).
    pub timeout: Option<Duration>,
    /// Contents of `ca_file`, `cert_file` and `key_file` once
    /// [`ClientConfig::preload`] has read them (used instead of the files).
    pub ca_pem: Option<Vec<u8>>,
    /// See `ca_pem`.
    pub cert_pem: Option<Vec<u8>>,
    /// See `ca_pem`.
    pub key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("url", &self.url)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls_domain", &self.tls_domain)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .field("cert_pem", &self.cert_pem.as_ref().map(Vec::len))
            .field("key_pem", &self.key_pem.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

static PROCESS_DEFAULTS: OnceLock<ClientConfig> = OnceLock::new();

/// The flags every process that talks to the manager takes for TLS and
/// the bearer token (flatten into a clap parser; `cli` feature).
#[cfg(feature = "cli")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ManagerSecurityArgs {
    /// CA certificate (PEM) that signed the manager's TLS certificate; needed
    /// for an https:// manager address.
    #[arg(long, value_name = "FILE", env = "BLKMESH_MANAGER_CA")]
    pub manager_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a manager that requires one (mutual TLS).
    #[arg(
        long,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_CERT",
        requires = "manager_key"
    )]
    pub manager_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --manager-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "BLKMESH_CLIENT_KEY",
        requires = "manager_cert"
    )]
    pub manager_key: Option<std::path::PathBuf>,
    /// File holding the bearer token the manager requires (sent as
    /// `authorization: Bearer <token>`).
    #[arg(long, value_name = "FILE", env = "BLKMESH_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

#[cfg(feature = "cli")]
impl ManagerSecurityArgs {
    /// `config` with these options added.
    pub fn apply(&self, mut config: ClientConfig) -> ClientConfig {
        config.ca_file = self.manager_ca.clone().or(config.ca_file);
        config.cert_file = self.manager_cert.clone().or(config.cert_file);
        config.key_file = self.manager_key.clone().or(config.key_file);
        config.token_file = self.token_file.clone().or(config.token_file);
        config
    }

    /// [`install_daemon_security`] with these options.
    pub fn install(&self, manager: Option<&str>) -> Result<(), ClientError> {
        install_daemon_security(
            manager,
            self.manager_ca.clone(),
            self.manager_cert.clone(),
            self.manager_key.clone(),
            self.token_file.clone(),
        )
    }
}

/// For a daemon (worker, frontend) at start: reads the security options
/// once (later reconnections need no file access, the process may have
/// dropped privileges by then), checks them against `manager` when given,
/// and makes them this process's defaults ([`set_process_defaults`]).
pub fn install_daemon_security(
    manager: Option<&str>,
    ca_file: Option<std::path::PathBuf>,
    cert_file: Option<std::path::PathBuf>,
    key_file: Option<std::path::PathBuf>,
    token_file: Option<std::path::PathBuf>,
) -> Result<(), ClientError> {
    let security = ClientConfig {
        ca_file,
        cert_file,
        key_file,
        token_file,
        ..Default::default()
    }
    .preload()?;
    if let Some(url) = manager {
        ClientConfig {
            url: url.to_string(),
            ..security.clone()
        }
        .check()?;
    }
    set_process_defaults(security);
    Ok(())
}

/// Sets the security options (everything but the URL) that
/// [`ClientConfig::for_process`] uses in this process. Call it once, early
/// in `main`; returns false (and changes nothing) if they were already set.
pub fn set_process_defaults(mut defaults: ClientConfig) -> bool {
    defaults.url.clear();
    PROCESS_DEFAULTS.set(defaults).is_ok()
}

fn env_path(key: &str) -> Option<PathBuf> {
    std::env::var_os(key)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// How the URL says to connect.
enum Target {
    Tcp { tls: bool },
    Unix(PathBuf),
}

impl ClientConfig {
    /// Plaintext, no token, no timeouts.
    pub fn new(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            ..ClientConfig::default()
        }
    }

    /// `url` with the CA, client certificate and token file named by
    /// `BLKMESH_MANAGER_CA`, `BLKMESH_CLIENT_CERT`, `BLKMESH_CLIENT_KEY` and
    /// `BLKMESH_TOKEN_FILE` (unset or empty: none).
    pub fn from_env(url: impl Into<String>) -> Self {
        ClientConfig {
            url: url.into(),
            ca_file: env_path(MANAGER_CA_ENV),
            cert_file: env_path(CLIENT_CERT_ENV),
            key_file: env_path(CLIENT_KEY_ENV),
            token_file: env_path(TOKEN_FILE_ENV),
            ..ClientConfig::default()
        }
    }

    /// `url` with this process's defaults ([`set_process_defaults`]), or
    /// [`ClientConfig::from_env`] when none were set.
    pub fn for_process(url: impl Into<String>) -> Self {
        match PROCESS_DEFAULTS.get() {
            Some(d) => ClientConfig {
                url: url.into(),
                ..d.clone()
            },
            None => ClientConfig::from_env(url),
        }
    }

    /// Verifies the manager with this CA certificate (PEM).
    pub fn with_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Presents this certificate and key (PEM) to the manager.
    pub fn with_client_identity(
        mut self,
        cert: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.cert_file = Some(cert.into());
        self.key_file = Some(key.into());
        self
    }

    /// Sends the token read from `path`.
    pub fn with_token_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.token_file = Some(path.into());
        self
    }

    /// Sends `token`.
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// Checks the manager's certificate against `name` instead of the URL's host.
    pub fn with_tls_domain(mut self, name: impl Into<String>) -> Self {
        self.tls_domain = Some(name.into());
        self
    }

    /// Bounds establishing the connection.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Gives every call a deadline.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// True when the URL asks for TLS (`https://`).
    pub fn is_tls(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// Reads every file and checks the options, without connecting: for
    /// binaries that want to fail at startup rather than at the first call.
    pub fn check(&self) -> Result<(), ClientError> {
        self.prepare().map(|_| ())
    }

    /// Reads the token file and the PEM files now and keeps their contents,
    /// so later (re)connections read nothing: for processes that drop
    /// privileges after startup. A token rotation then needs a restart.
    pub fn preload(mut self) -> Result<Self, ClientError> {
        if self.token.is_none() {
            if let Some(path) = &self.token_file {
                self.token = Some(load_token(path)?);
            }
        }
        if self.ca_pem.is_none() {
            if let Some(p) = &self.ca_file {
                self.ca_pem = Some(self.read_pem("CA certificate", p)?);
            }
        }
        if self.cert_pem.is_none() {
            if let Some(p) = &self.cert_file {
                self.cert_pem = Some(self.read_pem("client certificate", p)?);
            }
        }
        if self.key_pem.is_none() {
            if let Some(p) = &self.key_file {
                self.key_pem = Some(self.read_pem("client key", p)?);
            }
        }
        Ok(self)
    }

    /// Connects now; fails if the manager cannot be reached.
    pub async fn connect(&self) -> Result<ManagerChannel, ClientError> {
        let (endpoint, target, token) = self.prepare()?;
        let channel = match target {
            Target::Tcp { .. } => endpoint.connect().await,
            Target::Unix(path) => endpoint.connect_with_connector(unix_connector(path)).await,
        }
        .map_err(|e| self.connect_error(&e))?;
        Ok(InterceptedService::new(channel, token))
    }

    /// A channel that connects at the first call (and reconnects after
    /// failures). Must be called within a tokio runtime. Connection
    /// failures then surface as `UNAVAILABLE` statuses of the calls.
    pub fn connect_lazy(&self) -> Result<ManagerChannel, ClientError> {
        let (endpoint, target, token) = self.prepare()?;
        let channel = match target {
            Target::Tcp { .. } => endpoint.connect_lazy(),
            Target::Unix(path) => endpoint.connect_with_connector_lazy(unix_connector(path)),
        };
        Ok(InterceptedService::new(channel, token))
    }

    fn url_error(&self, reason: impl Into<String>) -> ClientError {
        ClientError::Url {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    fn tls_options(&self, reason: impl Into<String>) -> ClientError {
        ClientError::TlsOptions {
            url: self.url.clone(),
            reason: reason.into(),
        }
    }

    fn target(&self) -> Result<Target, ClientError> {
        const FORMS: &str = "expected http://HOST:PORT, https://HOST:PORT or unix:/PATH";
        if let Some(rest) = self.url.strip_prefix("unix:") {
            let path = format!("/{}", rest.trim_start_matches('/'));
            if path == "/" {
                return Err(self.url_error(format!("no socket path; {FORMS}")));
            }
            return Ok(Target::Unix(PathBuf::from(path)));
        }
        let uri: Uri = self
            .url
            .parse()
            .map_err(|e| self.url_error(format!("{e}; {FORMS}")))?;
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.url_error(format!("no host; {FORMS}")));
        }
        match uri.scheme_str() {
            Some("http") => Ok(Target::Tcp { tls: false }),
            Some("https") => Ok(Target::Tcp { tls: true }),
            Some(other) => Err(self.url_error(format!("unsupported scheme {other:?}; {FORMS}"))),
            None => Err(self.url_error(format!("no scheme; {FORMS}"))),
        }
    }

    fn read_pem(&self, what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
        read_limited(path, MAX_PEM_LEN).map_err(|source| ClientError::ReadFile {
            what,
            path: path.to_path_buf(),
            source,
        })
    }

    /// The preloaded contents, else the file's.
    fn pem(
        &self,
        what: &'static str,
        loaded: &Option<Vec<u8>>,
        file: &Option<PathBuf>,
    ) -> Result<Vec<u8>, ClientError> {
        match (loaded, file) {
            (Some(pem), _) => Ok(pem.clone()),
            (None, Some(path)) => self.read_pem(what, path),
            (None, None) => Ok(Vec::new()),
        }
    }

    /// The bearer token to send, if any.
    fn bearer(&self) -> Result<BearerToken, ClientError> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => {
                validate_token(t).map_err(|reason| TokenError::Invalid { path: None, reason })?;
                t.clone()
            }
            (None, Some(path)) => load_token(path)?,
            (None, None) => return Ok(BearerToken { value: None }),
        };
        BearerToken::new(&token).map_err(|reason| {
            ClientError::Token(TokenError::Invalid {
                path: self.token_file.clone(),
                reason,
            })
        })
    }

    fn prepare(&self) -> Result<(Endpoint, Target, BearerToken), ClientError> {
        let target = self.target()?;
        let token = self.bearer()?;
        let tls = matches!(target, Target::Tcp { tls: true });
        let has_ca = self.ca_file.is_some() || self.ca_pem.is_some();
        let has_cert = self.cert_file.is_some() || self.cert_pem.is_some();
        let has_key = self.key_file.is_some() || self.key_pem.is_some();
        if has_cert != has_key {
            return Err(self.tls_options(
                "a client certificate needs its key and a key its certificate \
                 (give both, or neither)",
            ));
        }
        if !tls {
            let given = if has_ca {
                Some("a CA certificate")
            } else if has_cert {
                Some("a client certificate")
            } else {
                None
            };
            if let Some(what) = given {
                let hint = match target {
                    Target::Unix(_) => "unix sockets are served without TLS; drop the TLS options",
                    Target::Tcp { .. } => "use an https:// address for TLS",
                };
                return Err(self.tls_options(format!(
                    "{what} was given but the address is plaintext; {hint}"
                )));
            }
        }
        let mut endpoint = match &target {
            // The URI only names the :authority; the connector ignores it.
            Target::Unix(_) => Endpoint::from_static("http://localhost"),
            Target::Tcp { .. } => Endpoint::from_shared(self.url.clone())
                .map_err(|e| self.url_error(error_chain(&e)))?,
        };
        if tls {
            if !has_ca {
                return Err(self.tls_options(format!(
                    "https:// needs the CA certificate that signed the manager's certificate \
                     (--manager-ca FILE, blkmeshctl --ca FILE, or ${MANAGER_CA_ENV})"
                )));
            }
            let ca = self.pem("CA certificate", &self.ca_pem, &self.ca_file)?;
            let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            if has_cert {
                let cert = self.pem("client certificate", &self.cert_pem, &self.cert_file)?;
                let key = self.pem("client key", &self.key_pem, &self.key_file)?;
                config = config.identity(Identity::from_pem(cert, key));
            }
            if let Some(domain) = &self.tls_domain {
                config = config.domain_name(domain.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(|e| ClientError::Tls {
                url: self.url.clone(),
                reason: error_chain(&e),
            })?;
        }
        if let Some(t) = self.connect_timeout {
            endpoint = endpoint.connect_timeout(t);
        }
        if let Some(t) = self.timeout {
            endpoint = endpoint.timeout(t);
        }
        Ok((endpoint, target, token))
    }

    fn connect_error(&self, e: &tonic::transport::Error) -> ClientError {
        let chain = error_chain(e);
        let hint = connect_hint(&chain, self.ca_file.as_deref());
        ClientError::Connect {
            url: self.url.clone(),
            reason: match hint {
                Some(h) => format!("{chain} ({h})"),
                None => chain,
            },
        }
    }
}

/// A hint for a connection error whose cause is recognized.
pub fn connect_hint(chain: &str, ca_file: Option<&Path>) -> Option<String> {
    let ca = || {
        ca_file
            .map(|p| format!("the CA certificate in {}", p.display()))
            .unwrap_or_else(|| "the given CA certificate".into())
    };
    if chain.contains("UnknownIssuer") || chain.contains("BadSignature") {
        Some(format!(
            "the manager's certificate is not signed by {}",
            ca()
        ))
    } else if chain.contains("NotValidForName") || chain.contains("not valid for name") {
        Some(
            "the manager's certificate does not name this host; connect by a name it carries"
                .into(),
        )
    } else if chain.contains("Expired") || chain.contains("NotValidYet") {
        Some("the manager's certificate is expired or not valid yet".into())
    } else if chain.contains("InvalidContentType") || chain.contains("corrupt message") {
        Some("the manager does not speak TLS on this port; use an http:// address".into())
    } else if chain.contains("CertificateRequired")
        || chain.contains("certificate required")
        || chain.contains("HandshakeFailure")
    {
        Some("the manager requires a client certificate signed by a CA it trusts".into())
    } else {
        None
    }
}

/// A status's message with the transport error behind it (a failed TLS
/// handshake often surfaces only at the first call) and a hint when the
/// cause is recognized.
pub fn status_message(status: &Status) -> String {
    let mut message = status.message().to_string();
    if let Some(source) = std::error::Error::source(status) {
        let chain = error_chain(source);
        if !message.contains(&chain) {
            message = format!("{message}: {chain}");
        }
        if let Some(hint) = connect_hint(&message, None) {
            message = format!("{message} ({hint})");
        }
    }
    message
}

fn unix_connector(
    path: PathBuf,
) -> impl tower::Service<
    Uri,
    Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
    Error = std::io::Error,
    Future = impl Send,
> + Clone
       + Send
       + 'static {
    tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    })
}

/// `e` and its causes, joined by `: `.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Adds `authorization: Bearer <token>` to every call (nothing without a token).
#[derive(Clone)]
pub struct BearerToken {
    value: Option<MetadataValue<Ascii>>,
}

impl fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BearerToken")
            .field("set", &self.value.is_some())
            .finish()
    }
}

impl BearerToken {
    /// Sends `token` (checked with [`validate_token`]).
    pub fn new(token: &str) -> Result<BearerToken, String> {
        validate_token(token)?;
        let mut value: MetadataValue<Ascii> = format!("Bearer {token}")
            .parse()
            .map_err(|_| "cannot be sent as a header value".to_string())?;
        value.set_sensitive(true);
        Ok(BearerToken { value: Some(value) })
    }

    /// Sends nothing.
    pub fn none() -> BearerToken {
        BearerToken { value: None }
    }
}

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.value {
            request.metadata_mut().insert(AUTHORIZATION, v.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn token_file_is_trimmed_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let ok = write(dir.path(), "ok", "  s3cr3t-token_1\n");
        assert_eq!(load_token(&ok).unwrap(), "s3cr3t-token_1");
        let empty = write(dir.path(), "empty", " \n\t\n");
        assert!(matches!(load_token(&empty), Err(TokenError::Empty { .. })));
        let spaced = write(dir.path(), "spaced", "two words\n");
        let e = load_token(&spaced).unwrap_err().to_string();
        assert!(e.contains("without spaces"), "{e}");
        let long = write(dir.path(), "long", &"x".repeat(MAX_TOKEN_LEN + 1));
        let e = load_token(&long).unwrap_err().to_string();
        assert!(e.contains("at most 4096"), "{e}");
        let e = load_token(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, TokenError::Read { .. }), "{e}");
        assert!(e.to_string().contains("cannot read token file"), "{e}");
    }

    #[test]
    fn url_forms() {
        for bad in [
            "127.0.0.1:50051",
            "ftp://x:1",
            "http://",
            "unix:",
            "not a url",
        ] {
            let e = ClientConfig::new(bad).check().unwrap_err();
            assert!(matches!(e, ClientError::Url { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("expected http://"), "{bad}: {e}");
        }
        ClientConfig::new("http://127.0.0.1:1").check().unwrap();
        ClientConfig::new("unix:/tmp/x.sock").check().unwrap();
        ClientConfig::new("unix:///tmp/x.sock").check().unwrap();
    }

    #[test]
    fn tls_options_must_fit_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "ca.pem", "not really a pem");
        let e = ClientConfig::new("https://127.0.0.1:1")
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("needs the CA certificate"), "{e}");
        let e = ClientConfig::new("http://127.0.0.1:1")
            .with_ca_file(&ca)
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("use an https:// address"), "{e}");
        let e = ClientConfig::new("unix:/x")
            .with_ca_file(&ca)
            .check()
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("unix sockets are served without TLS"),
            "{e}"
        );
        let e = ClientConfig::new("https://127.0.0.1:1")
            .with_ca_file(dir.path().join("nope.pem"))
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("cannot read CA certificate"), "{e}");
        let mut c = ClientConfig::new("https://127.0.0.1:1").with_ca_file(&ca);
        c.cert_file = Some(ca.clone());
        let e = c.check().unwrap_err();
        assert!(e.to_string().contains("needs its key"), "{e}");
    }

    #[test]
    fn inline_token_wins_and_is_redacted() {
        let c = ClientConfig::new("http://127.0.0.1:1")
            .with_token("abc")
            .with_token_file("/nonexistent");
        c.check().unwrap();
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("abc"), "{dbg}");
        assert!(dbg.contains("<redacted>"), "{dbg}");
        let e = ClientConfig::new("http://127.0.0.1:1")
            .with_token("a b")
            .check()
            .unwrap_err();
        assert!(e.to_string().contains("without spaces"), "{e}");
    }

    #[test]
    fn interceptor_adds_the_header() {
        let mut t = BearerToken::new("tok").unwrap();
        let r = t.call(Request::new(())).unwrap();
        assert_eq!(r.metadata().get(AUTHORIZATION).unwrap(), "Bearer tok");
        let mut none = BearerToken::none();
        let r = none.call(Request::new(())).unwrap();
        assert!(r.metadata().get(AUTHORIZATION).is_none());
    }

    #[test]
    fn preload_reads_the_files_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = write(dir.path(), "ca.pem", "ca");
        let cert = write(dir.path(), "c.pem", "cert");
        let key = write(dir.path(), "k.pem", "key");
        let token = write(dir.path(), "token", "tok\n");
        let c = ClientConfig::new("https://127.0.0.1:1")
            .with_ca_file(&ca)
            .with_client_identity(&cert, &key)
            .with_token_file(&token)
            .preload()
            .unwrap();
        for p in [&ca, &cert, &key, &token] {
            std::fs::remove_file(p).unwrap();
        }
        assert_eq!(c.token.as_deref(), Some("tok"));
        assert_eq!(c.ca_pem.as_deref(), Some(&b"ca"[..]));
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("tok\"") && dbg.contains("<redacted>"),
            "{dbg}"
        );
        // Nothing left to read: no file errors (tonic refuses the fake PEM later).
        match c.check() {
            Ok(()) => {}
            Err(e) => assert!(!e.to_string().contains("cannot read"), "{e}"),
        }
        let e = ClientConfig::new("http://x:1")
            .with_token_file(dir.path().join("gone"))
            .preload()
            .unwrap_err();
        assert!(e.to_string().contains("cannot read token file"), "{e}");
    }

    #[test]
    fn hints_name_the_cause() {
        let h = connect_hint(
            "transport error: invalid peer certificate: UnknownIssuer",
            Some(Path::new("/x/ca.pem")),
        )
        .unwrap();
        assert!(
            h.contains("not signed by the CA certificate in /x/ca.pem"),
            "{h}"
        );
        assert!(
            connect_hint("received corrupt message of type InvalidContentType", None)
                .unwrap()
                .contains("http://")
        );
        assert!(connect_hint("connection refused", None).is_none());
    }
}
