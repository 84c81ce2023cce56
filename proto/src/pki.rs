//! The consortium's PKI and mutual-TLS identities (rustls through tonic; certificates by
//! rcgen; identities read back with x509-parser).
//!
//! A certificate's subject CN is the party's name and its OU the role: `site` (a hospital's
//! agent), `server` (the aggregator or trainer), `client` (a trainer client). Keys are written
//! with permissions 0600.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// PKI errors.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    /// Certificate generation or parsing failed.
    #[error("certificate: {0}")]
    Cert(#[source] rcgen::Error),
    /// A name that cannot be a certificate subject.
    #[error("invalid name `{0}`: use 1-64 letters, digits, '-', '_', '.' or spaces")]
    Name(String),
}

/// The role a certificate grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A hospital's site agent.
    Site,
    /// A service (aggregator, trainer).
    Server,
    /// A trainer client (pharma, inference client).
    Client,
}

impl Role {
    /// The OU value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Site => "site",
            Role::Server => "server",
            Role::Client => "client",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "site" => Some(Role::Site),
            "server" => Some(Role::Server),
            "client" => Some(Role::Client),
            _ => None,
        }
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

fn write_private(path: &Path, data: &str) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(io(path))?;
    f.write_all(data.as_bytes()).map_err(io(path))
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
/// IO or generation failures.
pub fn init_ca(dir: &Path, name: &str, days: i64) -> Result<(), PkiError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
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
    let (pem, key_path) = paths(dir, "ca");
    std::fs::write(&pem, cert.pem()).map_err(io(&pem))?;
    write_private(&key_path, &key.serialize_pem())
}

/// Issue a certificate for `name` with `role`, signed by the CA in `dir`, valid from
/// `valid_from_days` (negative = in the past) for `days` days. Servers get SANs `localhost`
/// and `127.0.0.1` plus `name`.
///
/// # Errors
/// IO, a missing CA (run `fedee certs init`), or generation failures.
pub fn issue(
    dir: &Path,
    role: Role,
    name: &str,
    valid_from_days: i64,
    days: i64,
) -> Result<(PathBuf, PathBuf), PkiError> {
    valid_name(name)?;
    let (ca_pem, ca_key) = paths(dir, "ca");
    let ca_cert = std::fs::read_to_string(&ca_pem).map_err(io(&ca_pem))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(&ca_key).map_err(io(&ca_key))?)
        .map_err(PkiError::Cert)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(PkiError::Cert)?;
    let sans = match role {
        Role::Server => vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            name.replace(' ', "-"),
        ],
        _ => vec![],
    };
    let mut params = CertificateParams::new(sans).map_err(PkiError::Cert)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationalUnitName, role.as_str());
    params.distinguished_name = dn;
    params.extended_key_usages = match role {
        Role::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        _ => vec![ExtendedKeyUsagePurpose::ClientAuth],
    };
    let start = time::OffsetDateTime::now_utc() + time::Duration::days(valid_from_days)
        - time::Duration::minutes(5);
    params.not_before = start;
    params.not_after = start + time::Duration::days(days);
    let key = KeyPair::generate().map_err(PkiError::Cert)?;
    let cert = params.signed_by(&key, &issuer).map_err(PkiError::Cert)?;
    let (pem, key_path) = paths(dir, name);
    std::fs::write(&pem, cert.pem()).map_err(io(&pem))?;
    write_private(&key_path, &key.serialize_pem())?;
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

    /// Client side: verify the server against the CA (as `localhost`) and present our
    /// certificate.
    ///
    /// # Errors
    /// Unreadable files.
    pub fn client(&self) -> Result<ClientTlsConfig, PkiError> {
        let (ca, cert, key) = self.read()?;
        Ok(ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key))
            .domain_name("localhost"))
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
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).map_err(|e| {
        tonic::Status::unauthenticated(format!("unreadable client certificate: {e}"))
    })?;
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
        (Some(name), Some(role)) => Ok(Some(PeerIdentity {
            name: name.to_owned(),
            role,
        })),
        _ => Err(tonic::Status::unauthenticated(
            "client certificate lacks a CN or a role OU (site, server or client): issue it with `fedee certs issue`",
        )),
    }
}
