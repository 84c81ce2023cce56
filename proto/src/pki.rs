//! The consortium's PKI and mutual-TLS identities (rustls; certificates by rcgen; identities
//! read back with x509-parser).
//!
//! A certificate's subject CN is the party's name and its OU the role: `site` (a hospital's
//! agent), `aggregator`, `trainer` (the two services), `client` (a trainer client: pharma, an
//! inference client) or `operator` (the consortium's operator: reads every site's figures in
//! `Status`). Service certificates carry the host names and addresses they serve as SANs.
//!
//! # Security
//! Clients pin the server's identity twice ([`connect_lazy`]): the certificate must be valid
//! for the host they dial (not a fixed name), and carry the role they expect, so a trainer's
//! certificate cannot stand in for the aggregator or the other way round. Keys are written
//! 0600; every file is written atomically (temporary file, fsync, rename, directory fsync)
//! and never replaces an existing one unless asked to.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::transport::{Certificate, Channel, Endpoint, Identity, ServerTlsConfig, Uri};

/// PKI errors.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// A file exists and would be replaced.
    #[error(
        "{0} exists: pass --force to replace it (a replaced CA invalidates every certificate it issued)"
    )]
    Exists(String),
    /// Certificate generation failed.
    #[error("certificate: {0}")]
    Cert(#[source] rcgen::Error),
    /// A PEM file that holds no usable certificate or key.
    #[error("{path}: {problem}")]
    Pem { path: String, problem: String },
    /// rustls refused the configuration (e.g. a key that does not fit its certificate).
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A URL that cannot be dialled.
    #[error(
        "`{url}` is not a URL to connect to ({problem}): use http://HOST:PORT or https://HOST:PORT"
    )]
    Url { url: String, problem: String },
    /// A name that cannot be a certificate subject.
    #[error("invalid name `{0}`: use 1-64 letters, digits, '-', '_', '.' or spaces")]
    Name(String),
}

/// The role a certificate grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A hospital's site agent.
    Site,
    /// The federation service (sites talk only to this role).
    Aggregator,
    /// The compute provider's trainer service (trainer clients talk only to this role).
    Trainer,
    /// A trainer client (pharma, an inference client).
    Client,
    /// The consortium's operator (sees every site's figures in `Status`).
    Operator,
    /// One of the two non-colluding HSS-EE servers (`fedee hss-server`; HSS clients talk only
    /// to this role, so a trainer's certificate cannot stand in for one).
    Hss,
}

impl Role {
    /// The OU value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Aggregator => "aggregator",
            Role::Trainer => "trainer",
            Role::Client => "client",
            Role::Operator => "operator",
            Role::Hss => "hss",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        [
            Role::Site,
            Role::Aggregator,
            Role::Trainer,
            Role::Client,
            Role::Operator,
            Role::Hss,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
    /// Whether the role is a service (a server certificate with host names).
    pub fn is_service(self) -> bool {
        matches!(self, Role::Aggregator | Role::Trainer | Role::Hss)
    }
}

/// A verified peer: name (CN) and role (OU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// Subject CN.
    pub name: String,
    /// Role from the subject OU.
    pub role: Role,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Write `data` to `path` atomically (temporary file in the same folder, fsync, rename,
/// folder fsync), with permissions 0600 when `private`; an existing file is replaced only
/// when `replace`.
fn write_atomic(path: &Path, data: &str, private: bool, replace: bool) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    if !replace && path.exists() {
        return Err(PkiError::Exists(path.display().to_string()));
    }
    let mut f = atomic_write_file::AtomicWriteFile::open(path).map_err(io(path))?;
    let mode = if private { 0o600 } else { 0o644 };
    f.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))?;
    f.commit().map_err(io(path))
}

fn valid_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_. ".contains(c));
    if ok {
        Ok(())
    } else {
        Err(PkiError::Name(name.to_owned()))
    }
}

/// Paths of a party's PEM files in a PKI directory: `NAME.pem`, `NAME.key`.
pub fn paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let file = name.replace(' ', "_");
    (
        dir.join(format!("{file}.pem")),
        dir.join(format!("{file}.key")),
    )
}

/// Create a consortium CA in `dir` (`ca.pem`, `ca.key`), valid for `days`.
///
/// # Errors
/// IO or generation failures; [`PkiError::Exists`] if the CA exists and not `replace`.
pub fn init_ca(dir: &Path, name: &str, days: i64, replace: bool) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let (pem, key_path) = paths(dir, "ca");
    if !replace && (pem.exists() || key_path.exists()) {
        return Err(PkiError::Exists(pem.display().to_string()));
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name} CA"));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::days(days);
    let key = KeyPair::generate().map_err(PkiError::Cert)?;
    let cert = params.self_signed(&key).map_err(PkiError::Cert)?;
    write_atomic(&key_path, &key.serialize_pem(), true, replace)?;
    write_atomic(&pem, &cert.pem(), false, replace)
}

/// What a certificate is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertRequest {
    /// The party's role.
    pub role: Role,
    /// Its name (subject CN): a site's identity at the aggregator.
    pub name: String,
    /// Services: the DNS names and IP addresses clients dial (SANs); empty means
    /// `localhost` and `127.0.0.1`. Ignored for other roles.
    pub hosts: Vec<String>,
    /// Start of validity, in days from now (negative: in the past).
    pub valid_from_days: i64,
    /// Validity in days.
    pub days: i64,
}

impl CertRequest {
    /// A certificate for `name` with `role`, valid from now for `days` days, for the
    /// default hosts.
    pub fn new(role: Role, name: &str, days: i64) -> Self {
        Self {
            role,
            name: name.to_owned(),
            hosts: vec![],
            valid_from_days: 0,
            days,
        }
    }

    /// The SANs a service certificate carries.
    pub fn sans(&self) -> Vec<String> {
        match (self.role.is_service(), self.hosts.is_empty()) {
            (false, _) => vec![],
            (true, true) => vec!["localhost".to_owned(), "127.0.0.1".to_owned()],
            (true, false) => self.hosts.clone(),
        }
    }
}

/// Issue the certificate `req` asks for, signed by the CA in `dir`: `DIR/NAME.pem` and
/// `DIR/NAME.key` (0600).
///
/// # Errors
/// IO, a missing CA (run `fedee certs init`), a host that is neither a DNS name nor an IP
/// address, generation failures, or [`PkiError::Exists`] if the files exist and not
/// `replace`.
pub fn issue(dir: &Path, req: &CertRequest, replace: bool) -> Result<(PathBuf, PathBuf), PkiError> {
    let name = req.name.as_str();
    valid_name(name)?;
    let (pem, key_path) = paths(dir, name);
    if !replace && (pem.exists() || key_path.exists()) {
        return Err(PkiError::Exists(pem.display().to_string()));
    }
    let (ca_pem, ca_key) = paths(dir, "ca");
    let ca_cert = std::fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?)
        .map_err(PkiError::Cert)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(PkiError::Cert)?;
    let mut params = CertificateParams::new(req.sans()).map_err(PkiError::Cert)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, req.role.as_str());
    params.distinguished_name = dn;
    params.extended_key_usages = if req.role.is_service() {
        vec![ExtendedKeyUsagePurpose::ServerAuth]
    } else {
        vec![ExtendedKeyUsagePurpose::ClientAuth]
    };
    let start = time::OffsetDateTime::now_utc() + time::Duration::days(req.valid_from_days)
        - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::days(req.days);
    let key = KeyPair::generate().map_err(PkiError::Cert)?;
    let cert = params.signed_by(&key, &issuer).map_err(PkiError::Cert)?;
    write_atomic(&key_path, &key.serialize_pem(), true, replace)?;
    write_atomic(&pem, &cert.pem(), false, replace)?;
    Ok((pem, key_path))
}

/// A party's TLS material: the CA that verifies peers, and its own certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// Own certificate (PEM).
    pub cert: PathBuf,
    /// Own private key (PEM).
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files of party `name` in PKI directory `dir`.
    pub fn in_dir(dir: &Path, name: &str) -> Self {
        let (cert, key) = paths(dir, name);
        Self {
            ca: paths(dir, "ca").0,
            cert,
            key,
        }
    }

    fn read(&self) -> Result<(String, String, String), PkiError> {
        let r = |p: &Path| std::fs::read_to_string(p).map_err(io(p));
        Ok((r(&self.ca)?, r(&self.cert)?, r(&self.key)?))
    }

    /// Server side: present our certificate and require a client certificate from the CA.
    ///
    /// # Errors
    /// Unreadable files.
    pub fn server(&self) -> Result<ServerTlsConfig, PkiError> {
        let (ca, cert, key) = self.read()?;
        Ok(ServerTlsConfig::new()
            .identity(Identity::from_pem(cert, key))
            .client_ca_root(Certificate::from_pem(ca)))
    }

    /// Client side: a rustls configuration that verifies the server against the CA, for the
    /// host dialled, and requires the certificate to carry `server`'s role; presents our
    /// certificate; speaks HTTP/2.
    ///
    /// # Errors
    /// Unreadable or unusable PEM files.
    pub fn client_config(&self, server: Role) -> Result<rustls::ClientConfig, PkiError> {
        let Material {
            roots,
            chain,
            key,
            provider,
        } = self.material()?;
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| self.pem_error(&self.ca, &e.to_string()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(RoleVerifier {
                inner,
                role: server,
            }))
            .with_client_auth_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// The CA roots, our chain and key, parsed, and the crypto provider.
struct Material {
    roots: rustls::RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl TlsFiles {
    fn pem_error(&self, path: &Path, problem: &str) -> PkiError {
        PkiError::Pem {
            path: path.display().to_string(),
            problem: problem.to_owned(),
        }
    }

    /// Read and parse the three files.
    fn material(&self) -> Result<Material, PkiError> {
        let (ca, cert, key) = self.read()?;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
            let c = c.map_err(|_| self.pem_error(&self.ca, "not a PEM certificate"))?;
            roots
                .add(c)
                .map_err(|_| self.pem_error(&self.ca, "not a usable CA certificate"))?;
        }
        if roots.is_empty() {
            return Err(self.pem_error(&self.ca, "holds no certificate"));
        }
        let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| self.pem_error(&self.cert, "not a PEM certificate"))?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
            .map_err(|_| self.pem_error(&self.key, "not a PEM private key"))?;
        Ok(Material {
            roots,
            chain,
            key,
            provider: Arc::new(rustls::crypto::ring::default_provider()),
        })
    }

    /// Server side for HTTPS (the aggregator's dashboard): present our certificate; verify a
    /// client certificate against the CA when one is offered, but do not require one
    /// (browsers sign in with a token instead; the handler checks the role); HTTP/1.1.
    ///
    /// # Errors
    /// Unreadable or unusable PEM files.
    pub fn https_server_config(&self) -> Result<rustls::ServerConfig, PkiError> {
        let Material {
            roots,
            chain,
            key,
            provider,
        } = self.material()?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(|e| self.pem_error(&self.ca, &e.to_string()))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// WebPKI verification for the host dialled, then the server certificate's role.
#[derive(Debug)]
struct RoleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    role: Role,
}

impl rustls::client::danger::ServerCertVerifier for RoleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        match identity_of(end_entity.as_ref()) {
            Ok(p) if p.role == self.role => {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            Ok(p) => Err(rustls::Error::General(format!(
                "the server presented certificate `{}` with role `{}`, but this client talks only to the `{}`",
                p.name,
                p.role.as_str(),
                self.role.as_str()
            ))),
            Err(e) => Err(rustls::Error::General(format!(
                "the server's certificate names no role this build knows ({e}); reissue it with `fedee certs issue --{}`",
                self.role.as_str()
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A lazily connected channel to `url` (`http://HOST:PORT` without TLS, `https://HOST:PORT`
/// with it; a bare `HOST:PORT` takes the scheme from `tls`). With TLS, the server must
/// present a certificate from the consortium CA that is valid for HOST and carries `server`'s
/// role ([`TlsFiles::client_config`]); the connection is made on first use and remade after
/// failures, with `connect_timeout` per attempt.
///
/// # Errors
/// [`PkiError::Url`] for a URL without a host or port, unreadable or unusable TLS files.
pub fn connect_lazy(
    url: &str,
    tls: Option<&TlsFiles>,
    server: Role,
    connect_timeout: Duration,
) -> Result<Channel, PkiError> {
    let (endpoint, dialer) = dial(url, tls, server)?;
    let endpoint = endpoint.connect_timeout(connect_timeout);
    Ok(match dialer {
        Some(d) => endpoint.connect_with_connector_lazy(d),
        None => endpoint.connect_lazy(),
    })
}

/// As [`connect_lazy`], but connects now.
///
/// # Errors
/// As [`connect_lazy`] (`Ok(Err(_))`), and the transport's error when the server cannot be
/// reached or its certificate is refused.
pub async fn connect(
    url: &str,
    tls: Option<&TlsFiles>,
    server: Role,
    connect_timeout: Duration,
) -> Result<Result<Channel, tonic::transport::Error>, PkiError> {
    let (endpoint, dialer) = dial(url, tls, server)?;
    let endpoint = endpoint.connect_timeout(connect_timeout);
    Ok(match dialer {
        Some(d) => endpoint.connect_with_connector(d).await,
        None => endpoint.connect().await,
    })
}

fn dial(
    url: &str,
    tls: Option<&TlsFiles>,
    server: Role,
) -> Result<(Endpoint, Option<TlsDialer>), PkiError> {
    let bad = |problem: &str| PkiError::Url {
        url: url.to_owned(),
        problem: problem.to_owned(),
    };
    let full = if url.contains("://") {
        url.to_owned()
    } else {
        format!("{}://{url}", if tls.is_some() { "https" } else { "http" })
    };
    let uri: Uri = full.parse().map_err(|_| bad("unparsable"))?;
    let host = uri.host().ok_or_else(|| bad("no host"))?.to_owned();
    let port = uri.port_u16().ok_or_else(|| bad("no port"))?;
    let Some(tls) = tls else {
        return Ok((Endpoint::from(uri), None));
    };
    if uri.scheme_str() == Some("http") {
        return Err(bad("http:// with TLS files; use https://"));
    }
    let name = ServerName::try_from(unbracket(&host).to_owned())
        .map_err(|_| bad("the host is neither a DNS name nor an IP address"))?;
    // TLS happens in the dialer, so the endpoint itself is plain HTTP/2.
    let plain: Uri = format!("http://{host}:{port}")
        .parse()
        .map_err(|_| bad("unparsable"))?;
    let dialer = TlsDialer {
        config: Arc::new(tls.client_config(server)?),
        name,
    };
    Ok((Endpoint::from(plain), Some(dialer)))
}

/// `::1` from `[::1]`.
fn unbracket(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Dials TCP and runs the TLS handshake for the host the client was asked to reach.
#[derive(Clone)]
struct TlsDialer {
    config: Arc<rustls::ClientConfig>,
    name: ServerName<'static>,
}

type TlsIo = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

impl tower::Service<Uri> for TlsDialer {
    type Response = TlsIo;
    type Error = std::io::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<TlsIo, std::io::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), std::io::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, dial: Uri) -> Self::Future {
        let (config, name) = (self.config.clone(), self.name.clone());
        Box::pin(async move {
            let host = dial.host().unwrap_or_default().to_owned();
            let port = dial.port_u16().unwrap_or(443);
            let tcp = tokio::net::TcpStream::connect((unbracket(&host), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        })
    }
}

/// The verified identity of the peer of `req`, from its TLS client certificate. `None` on a
/// connection without TLS.
///
/// # Errors
/// `Unauthenticated` if TLS is on but the certificate has no CN or no known role.
pub fn peer_identity<T>(req: &tonic::Request<T>) -> Result<Option<PeerIdentity>, tonic::Status> {
    let Some(certs) = req.peer_certs() else {
        return Ok(None);
    };
    let leaf = certs
        .first()
        .ok_or_else(|| tonic::Status::unauthenticated("no client certificate"))?;
    identity_of(leaf.as_ref())
        .map(Some)
        .map_err(tonic::Status::unauthenticated)
}

/// The name (CN) and role (OU) a DER certificate carries.
///
/// # Errors
/// A message naming what is missing (for an unreadable certificate, no CN, or no role this
/// build knows: certificates of older builds said `server`).
pub fn identity_of(der: &[u8]) -> Result<PeerIdentity, String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok());
    let ou = subject
        .iter_organizational_unit()
        .next()
        .and_then(|a| a.as_str().ok());
    match (cn, ou.and_then(Role::parse)) {
        (Some(name), Some(role)) => Ok(PeerIdentity {
            name: name.to_owned(),
            role,
        }),
        _ => Err(format!(
            "certificate {} lacks a CN or a known role OU (site, aggregator, trainer, client, operator; found {:?}): issue it with `fedee certs issue`",
            cn.unwrap_or("(no CN)"),
            ou.unwrap_or("none")
        )),
    }
}
