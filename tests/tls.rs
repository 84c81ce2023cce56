//! Mutual TLS end to end: the real `fedee` aggregator binary over loopback, and clients with
//! no certificate, a certificate from another CA, an expired certificate, and a valid
//! certificate of a site that is not enrolled. Each is refused with a clear error, and the
//! aggregator logs it. Clients pin the service they reach: its certificate must be valid for
//! the host dialled and carry the expected role (a trainer cannot pose as the aggregator).

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use fedee_proto::pki::{CertRequest, Role, TlsFiles, init_ca, issue};
use fedee_proto::v1::JoinRequest;
use fedee_proto::v1::federation_client::FederationClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

/// The heart-disease example spec (its model is what these tests' aggregators start from).
const HEART: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/examples/heart-disease/federation.toml"
);

fn fedee(args: &[&str], dir: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

struct Aggregator {
    child: Child,
    addr: String,
    log: std::path::PathBuf,
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_aggregator(dir: &Path) -> Aggregator {
    let log = dir.join("aggregator.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args([
            "aggregator",
            "--listen",
            "127.0.0.1:0",
            "--tls-dir",
            "pki",
            "--enroll",
            "Cleveland",
        ])
        .args([
            "--initial-model",
            "g0.safetensors",
            "--database-url",
            "sqlite://agg.db?mode=rwc",
            "--rounds",
            "1",
            // A test of TLS, not of privacy (σ = 0.1 by default).
            "--max-epsilon",
            "inf",
        ])
        .current_dir(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("aggregator exited before listening")
            .unwrap();
        if let Some(a) = line.strip_prefix("aggregator listening on ") {
            break a.trim().to_owned();
        }
    };
    // Keep draining stderr into a file for the log assertions.
    let log_path = log.clone();
    std::thread::spawn(move || {
        use std::io::Write;
        let mut f = std::fs::File::create(log_path).unwrap();
        for l in lines.map_while(Result::ok) {
            let _ = writeln!(f, "{l}");
        }
    });
    Aggregator { child, addr, log }
}

async fn join(addr: &str, tls: ClientTlsConfig, site: &str) -> Result<(), String> {
    let ep = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| format!("{e:?}"))?;
    let ch = ep.connect().await.map_err(|e| format!("connect: {e:?}"))?;
    FederationClient::new(ch)
        .join(JoinRequest {
            site: site.into(),
            ..Default::default()
        })
        .await
        .map(|_| ())
        .map_err(|s| {
            format!(
                "{:?}: {} {:?}",
                s.code(),
                s.message(),
                std::error::Error::source(&s)
            )
        })
}

fn pem(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

fn client_tls(ca: &Path, cert_key: Option<(&Path, &Path)>) -> ClientTlsConfig {
    let mut c = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pem(ca)))
        .domain_name("localhost");
    if let Some((cert, key)) = cert_key {
        c = c.identity(Identity::from_pem(pem(cert), pem(key)));
    }
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_admits_only_enrolled_sites_with_valid_certificates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The consortium PKI through the CLI, as an operator would create it.
    for args in [
        vec!["certs", "init", "--dir", "pki"],
        vec![
            "certs",
            "issue",
            "--dir",
            "pki",
            "--aggregator",
            "aggregator",
        ],
        vec!["certs", "issue", "--dir", "pki", "--site", "Cleveland"],
        vec!["certs", "issue", "--dir", "pki", "--site", "Hungary"],
        vec!["init-model", "--spec", HEART, "--out", "g0.safetensors"],
    ] {
        let out = fedee(&args, dir);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("pki/Cleveland.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }
    // A rogue CA, and an expired certificate from the real CA.
    init_ca(&dir.join("rogue"), "rogue", 10, false).unwrap();
    issue(
        &dir.join("rogue"),
        &CertRequest::new(Role::Site, "Cleveland", 10),
        false,
    )
    .unwrap();
    let expired = CertRequest {
        valid_from_days: -10,
        ..CertRequest::new(Role::Site, "Expired", 1)
    };
    issue(&dir.join("pki"), &expired, false).unwrap();

    let agg = start_aggregator(dir);
    let ca = dir.join("pki/ca.pem");
    let good = TlsFiles::in_dir(&dir.join("pki"), "Cleveland");

    // The enrolled site with its own certificate is admitted.
    join(
        &agg.addr,
        client_tls(&ca, Some((&good.cert, &good.key))),
        "Cleveland",
    )
    .await
    .unwrap();

    let refusals = [
        ("no client certificate", client_tls(&ca, None), "Cleveland"),
        (
            "certificate from another CA",
            client_tls(
                &ca,
                Some((
                    &dir.join("rogue/Cleveland.pem"),
                    &dir.join("rogue/Cleveland.key"),
                )),
            ),
            "Cleveland",
        ),
        (
            "expired certificate",
            client_tls(
                &ca,
                Some((&dir.join("pki/Expired.pem"), &dir.join("pki/Expired.key"))),
            ),
            "Expired",
        ),
    ];
    for (what, tls, site) in refusals {
        let err = join(&agg.addr, tls, site).await.expect_err(what);
        eprintln!("{what}: {err}");
    }
    // A valid certificate of a site that is not enrolled: refused by name.
    let hungary = TlsFiles::in_dir(&dir.join("pki"), "Hungary");
    let err = join(
        &agg.addr,
        client_tls(&ca, Some((&hungary.cert, &hungary.key))),
        "Hungary",
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("PermissionDenied") && err.contains("not enrolled") && err.contains("Hungary"),
        "{err}"
    );
    // A certificate for one site cannot claim another.
    let err = join(
        &agg.addr,
        client_tls(&ca, Some((&good.cert, &good.key))),
        "Hungary",
    )
    .await
    .unwrap_err();
    assert!(
        err.contains("PermissionDenied") && err.contains("Cleveland"),
        "{err}"
    );

    // Plaintext against the TLS port fails too.
    let plain = Endpoint::from_shared(format!("http://{}", agg.addr))
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = plain {
        assert!(
            FederationClient::new(ch)
                .join(JoinRequest {
                    site: "Cleveland".into(),
                    ..Default::default()
                })
                .await
                .is_err()
        );
    }

    // The aggregator logged every refusal.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let log = std::fs::read_to_string(&agg.log).unwrap_or_default();
    assert!(
        log.matches("tls accept error").count() >= 3,
        "handshake refusals must be logged:\n{log}"
    );
    assert!(log.contains("not enrolled"), "{log}");
}

#[test]
fn services_refuse_to_start_without_a_transport_choice() {
    let tmp = tempfile::tempdir().unwrap();
    let out = fedee(&["trainer", "--listen", "127.0.0.1:0"], tmp.path());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-dir") && err.contains("--insecure"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_served_and_sigterm_drains_and_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for args in [
        vec!["certs", "init", "--dir", "pki"],
        vec![
            "certs",
            "issue",
            "--dir",
            "pki",
            "--aggregator",
            "aggregator",
        ],
        vec!["certs", "issue", "--dir", "pki", "--client", "ops"],
        vec!["init-model", "--spec", HEART, "--out", "g0.safetensors"],
    ] {
        assert!(fedee(&args, dir).status.success(), "{args:?}");
    }
    let mut agg = start_aggregator(dir);
    let ops = TlsFiles::in_dir(&dir.join("pki"), "ops");
    let ep = Endpoint::from_shared(format!("https://{}", agg.addr))
        .unwrap()
        .tls_config(client_tls(
            &dir.join("pki/ca.pem"),
            Some((&ops.cert, &ops.key)),
        ))
        .unwrap();
    let mut health =
        tonic_health::pb::health_client::HealthClient::new(ep.connect().await.unwrap());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "fedee.v1.Federation".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let pid = agg.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(s) = agg.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed().as_secs() < 10,
            "aggregator did not exit after SIGTERM"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status:?}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    let log = std::fs::read_to_string(&agg.log).unwrap_or_default();
    assert!(
        log.contains("shutting down") && log.contains("aggregator stopped"),
        "{log}"
    );
}

/// A `fedee trainer` on a free loopback port with the certificate NAME of `dir/pki`.
fn start_trainer(dir: &Path, name: &str) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedee"))
        .args(["trainer", "--listen", "127.0.0.1:0", "--tls-dir", "pki"])
        .args(["--tls-name", name])
        .current_dir(dir)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = lines.next().expect("trainer exited early").unwrap();
        if let Some(a) = line.strip_prefix("trainer listening on ") {
            break a.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    (child, addr)
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_pin_the_host_and_the_role_of_the_service_they_reach() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for args in [
        vec!["certs", "init", "--dir", "pki"],
        vec![
            "certs",
            "issue",
            "--dir",
            "pki",
            "--aggregator",
            "aggregator",
        ],
        vec!["certs", "issue", "--dir", "pki", "--trainer", "trainer"],
        vec![
            "certs",
            "issue",
            "--dir",
            "pki",
            "--trainer",
            "elsewhere",
            "--host",
            "trainer.example.org",
        ],
        vec!["certs", "issue", "--dir", "pki", "--site", "Cleveland"],
        vec!["certs", "issue", "--dir", "pki", "--client", "pharma"],
        vec!["certs", "issue", "--dir", "pki", "--operator", "ops"],
        vec!["init-model", "--spec", HEART, "--out", "g0.safetensors"],
    ] {
        let out = fedee(&args, dir);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Nothing is silently replaced.
    for args in [
        vec!["certs", "init", "--dir", "pki"],
        vec!["certs", "issue", "--dir", "pki", "--site", "Cleveland"],
    ] {
        let before = std::fs::read(dir.join("pki/ca.pem")).unwrap();
        let out = fedee(&args, dir);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("--force"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read(dir.join("pki/ca.pem")).unwrap(), before);
    }
    let agg = start_aggregator(dir);
    let (mut trainer, trainer_addr) = start_trainer(dir, "trainer");
    let (mut elsewhere, elsewhere_addr) = start_trainer(dir, "elsewhere");
    let pki = dir.join("pki");
    let site = TlsFiles::in_dir(&pki, "Cleveland");
    let pharma = TlsFiles::in_dir(&pki, "pharma");
    let dial = |addr: &str, files: &TlsFiles, role: Role| {
        let (addr, files) = (format!("https://{addr}"), files.clone());
        async move {
            fedee_proto::pki::connect(&addr, Some(&files), role, std::time::Duration::from_secs(5))
                .await
                .unwrap()
        }
    };
    // The right pairs connect, and the site is admitted.
    let ch = dial(&agg.addr, &site, Role::Aggregator).await.unwrap();
    let mut cleveland = FederationClient::new(ch);
    cleveland
        .join(JoinRequest {
            site: "Cleveland".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    // Per-site figures are for the operator; other certificates see the federation's.
    cleveland
        .leave(fedee_proto::v1::LeaveRequest {
            site: "Cleveland".into(),
            reason: "privacy budget spent".into(),
        })
        .await
        .unwrap();
    let ops = TlsFiles::in_dir(&pki, "ops");
    for (who, files, per_site) in [
        ("operator", &ops, true),
        ("site", &site, false),
        ("pharma", &pharma, false),
    ] {
        let ch = dial(&agg.addr, files, Role::Aggregator).await.unwrap();
        let st = FederationClient::new(ch)
            .status(fedee_proto::v1::StatusRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.per_site, per_site, "{who}");
        let departed = if per_site {
            "Cleveland: privacy budget spent"
        } else {
            "Cleveland"
        };
        assert_eq!(st.departed, vec![departed.to_owned()], "{who}: {st:?}");
    }
    dial(&trainer_addr, &pharma, Role::Trainer).await.unwrap();
    // A trainer's certificate presented as the aggregator, and the other way round.
    let err = format!(
        "{:?}",
        dial(&trainer_addr, &site, Role::Aggregator)
            .await
            .unwrap_err()
    );
    assert!(
        err.contains("role `trainer`") && err.contains("talks only to the `aggregator`"),
        "{err}"
    );
    let err = format!(
        "{:?}",
        dial(&agg.addr, &pharma, Role::Trainer).await.unwrap_err()
    );
    assert!(err.contains("role `aggregator`"), "{err}");
    // An HSS client dials only the `hss` role: a trainer cannot stand in for an HSS server.
    let err = format!(
        "{:?}",
        dial(&trainer_addr, &pharma, Role::Hss).await.unwrap_err()
    );
    assert!(
        err.contains("role `trainer`") && err.contains("talks only to the `hss`"),
        "{err}"
    );
    // A certificate for another host is refused, whatever its role.
    let err = format!(
        "{:?}",
        dial(&elsewhere_addr, &pharma, Role::Trainer)
            .await
            .unwrap_err()
    );
    assert!(err.contains("NotValidForName"), "{err}");
    // Through the real site agent: a trainer at the aggregator's address is refused.
    let out = fedee(
        &[
            "site",
            "--tls-dir",
            "pki",
            "--site",
            "Cleveland",
            "--aggregator",
            &trainer_addr,
            "--data",
            "none.csv",
            "--retries",
            "0",
        ],
        dir,
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("role `trainer`"),
        "{err}"
    );
    for c in [&mut trainer, &mut elsewhere] {
        let _ = c.kill();
        let _ = c.wait();
    }
}
