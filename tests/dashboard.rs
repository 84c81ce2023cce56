//! The operator's dashboard (`fedee aggregator --dashboard-listen`): its handlers on a seeded
//! SQLite and PostgreSQL database (credentials, escaping, security headers, the JSON twins,
//! server-sent events), and the real HTTPS listener with operator and site certificates.

mod common;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode, header};
use fedee_aggregator::dashboard::{self, Dashboard, Peer, data::Info};
use fedee_aggregator::metrics::Metrics;
use fedee_aggregator::store::{MetricRow, RoundEnd, Store, UpdateMeta};
use fedee_proto::pki::{PeerIdentity, Role};
use tower::ServiceExt;

const TOKEN: &str = "a-dashboard-token-for-tests";
/// A site name that is also markup: it must reach the page as text.
const HOSTILE: &str = "<script>alert(1)</script>";

fn info() -> Info {
    Info {
        summary: "3 rounds, quorum 2, FedAvg".into(),
        spec_sha256: String::new(),
        rounds: 3,
        min_sites: 2,
        round_timeout_s: 60.0,
        dp_mode: "site".into(),
        privacy_unit: "a site's update".into(),
        delta: 1e-5,
        planned_epsilon: 2.0,
        max_epsilon: 10.0,
        secure_aggregation: false,
    }
}

/// Round 1 closed with updates from Cleveland and HOSTILE; round 2 failed with only
/// Cleveland's; round 3 open. Hungary left (budget); one rejected update.
async fn seed(store: &Store) {
    store.init("model1").await.unwrap();
    for s in ["Cleveland", HOSTILE, "Hungary"] {
        store.add_site(s).await.unwrap();
    }
    let update = |site: &str| UpdateMeta {
        site: site.into(),
        num_examples: 10,
        sha256: format!("sha-{site}"),
    };
    store
        .insert_update(1, &update("Cleveland"), 1000)
        .await
        .unwrap();
    store
        .insert_update(1, &update(HOSTILE), 3000)
        .await
        .unwrap();
    let end = |round, state, reason, epsilon| RoundEnd {
        round,
        state,
        reason,
        rho: 0.1,
        epsilon,
        next_sha256: "model",
        server_state_sha256: None,
        open_next_with_deadline_ms: Some(fedee_aggregator::store::now_ms() + 60_000),
    };
    store.end_round(&end(1, "closed", None, 0.5)).await.unwrap();
    for (site, acc, n) in [("Cleveland", 0.8, 30), (HOSTILE, 0.6, 10)] {
        store
            .insert_metric(&MetricRow {
                model: 2,
                site: site.into(),
                test_accuracy: acc,
                num_test_examples: n,
                balanced_accuracy: None,
                macro_f1: None,
                auroc: None,
                validation_accuracy: None,
                num_validation_examples: 0,
            })
            .await
            .unwrap();
    }
    store
        .insert_update(2, &update("Cleveland"), 1000)
        .await
        .unwrap();
    store
        .end_round(&end(
            2,
            "failed",
            Some("quorum not met: 1 of 2 sites submitted"),
            0.5,
        ))
        .await
        .unwrap();
    store
        .insert_rejection(
            Some(2),
            Some(HOSTILE),
            "layout",
            "tensor `<b>w</b>` has the wrong shape",
        )
        .await
        .unwrap();
    store
        .insert_departure(
            "Hungary",
            "privacy budget: site `Hungary` has spent ε = 2.1",
        )
        .await
        .unwrap();
}

fn app(store: Store) -> axum::Router {
    Dashboard::new(
        store,
        Metrics::new(),
        info(),
        Some(dashboard::token_hash(TOKEN)),
        false,
    )
    .router()
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn call(app: &axum::Router, req: Request<Body>, peer: Option<PeerIdentity>) -> Reply {
    let mut req = req;
    req.extensions_mut().insert(ConnectInfo(Peer(peer)));
    let r = app.clone().oneshot(req).await.unwrap();
    let status = r.status();
    let headers = r.headers().clone();
    let body = if headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.to_str().unwrap().starts_with("text/event-stream"))
    {
        String::new() // an endless stream
    } else {
        let b = axum::body::to_bytes(r.into_body(), 64 << 20).await.unwrap();
        String::from_utf8(b.to_vec()).unwrap()
    };
    Reply {
        status,
        headers,
        body,
    }
}

fn get(path: &str, token: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(t) = token {
        b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    b.body(Body::empty()).unwrap()
}

fn who(name: &str, role: Role) -> Option<PeerIdentity> {
    Some(PeerIdentity {
        name: name.into(),
        role,
    })
}

async fn handlers_on(url: &str) {
    let store = Store::connect(url).await.unwrap();
    seed(&store).await;
    let app = app(store);

    // No credentials: 401, the sign-in form for pages, JSON with WWW-Authenticate for the API.
    let r = call(&app, get("/", None), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.body.contains("name=\"token\""), "{}", r.body);
    assert!(!r.body.contains("Cleveland"), "no data without credentials");
    assert_eq!(r.headers[header::CONTENT_SECURITY_POLICY], dashboard::CSP);
    let r = call(&app, get("/api/overview", None), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
    assert!(r.body.contains("\"error\""), "{}", r.body);
    let r = call(&app, get("/events", None), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A wrong token.
    let r = call(&app, get("/api/overview", Some("not-the-token")), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    // A site certificate: 403, even with the token.
    for path in ["/", "/api/privacy", "/events"] {
        let r = call(&app, get(path, Some(TOKEN)), who("Cleveland", Role::Site)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{path}");
        assert!(r.body.contains("operator certificate"), "{}", r.body);
    }
    // An operator certificate, no token: in.
    let r = call(&app, get("/", None), who("ops", Role::Operator)).await;
    assert_eq!(r.status, StatusCode::OK);

    // Every page with the token: escaped, with the security headers.
    for (path, needle) in [
        ("/", "Cleveland"),
        ("/accuracy", "test accuracy"),
        ("/privacy", "planned ε"),
        ("/updates", "quorum not met"),
    ] {
        let r = call(&app, get(path, Some(TOKEN)), None).await;
        assert_eq!(r.status, StatusCode::OK, "{path}: {}", r.body);
        assert!(r.body.contains(needle), "{path} lacks {needle}");
        assert_eq!(r.headers[header::CONTENT_SECURITY_POLICY], dashboard::CSP);
        assert_eq!(r.headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
        assert_eq!(r.headers[header::CACHE_CONTROL], "no-store");
        assert!(
            !r.body.contains("<script>alert") && !r.body.contains("<b>w</b>"),
            "{path} let markup through"
        );
        assert!(
            !r.body.contains("<script>") || r.body.contains("src=\"/static/dashboard.js\""),
            "{path}: only the page's own script"
        );
        if path != "/privacy" {
            assert!(
                r.body.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
                "{path} must show the hostile name as text"
            );
        }
        // The live script's fragment: <main>'s content only.
        let f = call(
            &app,
            get(&format!("{path}?fragment=main"), Some(TOKEN)),
            None,
        )
        .await;
        assert_eq!(f.status, StatusCode::OK);
        assert!(
            !f.body.contains("<html") && f.body.contains("<h1>"),
            "{path}"
        );
    }
    let r = call(&app, get("/updates", Some(TOKEN)), None).await;
    assert!(
        r.body.contains("&lt;b&gt;w&lt;/b&gt;"),
        "rejection reason as text"
    );

    // Server-sent events.
    let r = call(&app, get("/events", Some(TOKEN)), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/event-stream");

    // The JSON twins carry the same figures.
    let json = |r: Reply| -> serde_json::Value { serde_json::from_str(&r.body).unwrap() };
    let o = json(call(&app, get("/api/overview", Some(TOKEN)), None).await);
    assert_eq!(o["current_round"], 3);
    assert_eq!(o["stage"], "open");
    assert_eq!(o["joined"], 3);
    assert_eq!(o["departed"], 1);
    let failed = &o["recent_rounds"][1];
    assert_eq!(failed["round"], 2);
    assert_eq!(failed["state"], "failed");
    assert_eq!(failed["missing"], serde_json::json!([HOSTILE, "Hungary"]));
    let closed = &o["recent_rounds"][2];
    assert_eq!(
        (closed["updates"].as_u64(), closed["bytes"].as_u64()),
        (Some(2), Some(4000))
    );
    let a = json(call(&app, get("/api/accuracy", Some(TOKEN)), None).await);
    let chart = &a["charts"][0];
    assert_eq!(chart["metric"], "test accuracy");
    assert_eq!(chart["sites"].as_array().unwrap().len(), 2);
    let w = chart["weighted"]["points"][0][1].as_f64().unwrap();
    assert!((w - (0.8 * 30.0 + 0.6 * 10.0) / 40.0).abs() < 1e-12, "{w}");
    let p = json(call(&app, get("/api/privacy", Some(TOKEN)), None).await);
    assert_eq!(p["source"], "federation accounting");
    assert_eq!(
        p["sites"].as_array().unwrap().len(),
        2,
        "sites that submitted in ended rounds"
    );
    assert_eq!(p["budget_departures"][0][0], "Hungary");
    let u = json(call(&app, get("/api/updates", Some(TOKEN)), None).await);
    assert_eq!(u["accepted"], 3);
    assert_eq!(u["rejected_by_reason"], serde_json::json!([["layout", 1]]));
    assert_eq!(u["failures"][0]["round"], 2);

    // Sign-in: a cookie that is HttpOnly and SameSite=Strict, then pages by cookie.
    let form = |t: &str| {
        Request::post("/login")
            .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(Body::from(format!("token={t}")))
            .unwrap()
    };
    let r = call(&app, form("wrong"), None).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.headers.get(header::SET_COOKIE).is_none());
    let r = call(&app, form(TOKEN), None).await;
    assert_eq!(r.status, StatusCode::SEE_OTHER);
    let cookie = r.headers[header::SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_owned();
    let req = Request::get("/privacy")
        .header(header::COOKIE, pair)
        .body(Body::empty())
        .unwrap();
    assert_eq!(call(&app, req, None).await.status, StatusCode::OK);
}

#[tokio::test]
async fn handlers_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    handlers_on(&format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("agg.db").display()
    ))
    .await;
}

#[tokio::test]
async fn handlers_on_postgres() {
    if let Some(url) = common::postgres_database("dashboard").await {
        handlers_on(&url).await;
    }
}

/// A long history is charted from at most about 300 points per series: every
/// `⌈rounds / 300⌉`-th round and each site's latest (a site that left early keeps its last
/// point), and the weighted line only where every site's point was read.
#[tokio::test]
async fn long_histories_are_charted_thinned_with_each_sites_latest_point() {
    use fedee_aggregator::store::LedgerRow;
    let store = Store::connect("sqlite::memory:").await.unwrap();
    store.init("m").await.unwrap();
    let rounds = 700u32;
    for r in 1..=rounds {
        for (site, last) in [("a", rounds), ("b", 333)] {
            if r > last {
                continue;
            }
            store
                .insert_metric(&MetricRow {
                    model: r + 1,
                    site: site.into(),
                    test_accuracy: f64::from(r) / 1000.0,
                    num_test_examples: 10,
                    balanced_accuracy: None,
                    macro_f1: None,
                    auroc: None,
                    validation_accuracy: None,
                    num_validation_examples: 0,
                })
                .await
                .unwrap();
            store
                .insert_ledger(&LedgerRow {
                    site: site.into(),
                    round: r,
                    unit: "patient record".into(),
                    mechanism: "m".into(),
                    sampling_rate: 0.1,
                    noise_multiplier: 1.0,
                    steps: 1,
                    epsilon: f64::from(r) / 100.0,
                    delta: 1e-5,
                })
                .await
                .unwrap();
        }
        store
            .end_round(&RoundEnd {
                round: r,
                state: "closed",
                reason: None,
                rho: 0.0,
                epsilon: 1.0,
                next_sha256: "m",
                server_state_sha256: None,
                open_next_with_deadline_ms: (r < rounds).then_some(0),
            })
            .await
            .unwrap();
    }
    let a = dashboard::data::accuracy(&store).await.unwrap();
    let chart = &a.charts[0];
    let step = 701u32.div_ceil(dashboard::data::MAX_POINTS);
    for s in &chart.sites {
        assert!(s.points.len() <= 302, "{} points", s.points.len());
        assert!(
            s.points
                .iter()
                .all(|p| p.0 % step == 0 || p == s.points.last().unwrap())
        );
    }
    let b = chart.sites.iter().find(|s| s.name == "b").unwrap();
    assert_eq!(b.points.last().unwrap(), &(333, 0.333), "b's latest point");
    let a_last = chart
        .sites
        .iter()
        .find(|s| s.name == "a")
        .unwrap()
        .points
        .last()
        .unwrap()
        .0;
    assert_eq!(a_last, rounds);
    // The weighted line has no point where only b's off-grid latest was read.
    assert!(
        chart
            .weighted
            .points
            .iter()
            .all(|p| p.0 != 333 || 333 % step == 0)
    );
    let p = dashboard::data::privacy(&store, &info()).await.unwrap();
    let b = p.sites.iter().find(|s| s.name == "b").unwrap();
    assert_eq!(b.points.last().unwrap(), &(333, 3.33));
    assert!(p.sites.iter().all(|s| s.points.len() <= 302));
}

/// `GET path` over HTTPS with `cert`'s client certificate (or none): the status code.
async fn https_status(
    addr: std::net::SocketAddr,
    pki: &std::path::Path,
    cert: Option<&str>,
    path: &str,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = match cert {
        Some(name) => fedee_proto::pki::TlsFiles::in_dir(pki, name)
            .client_config(Role::Aggregator)
            .unwrap(),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            let ca = std::fs::read(pki.join("ca.pem")).unwrap();
            use rustls::pki_types::pem::PemObject;
            for c in rustls::pki_types::CertificateDer::pem_slice_iter(&ca) {
                roots.add(c.unwrap()).unwrap();
            }
            rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut head = vec![0u8; 64];
    let n = tls.read(&mut head).await.unwrap();
    let line = String::from_utf8_lossy(&head[..n]).to_string();
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {line}"))
}

/// The real listener: HTTPS with the aggregator's certificate, client certificates verified
/// by the consortium CA and read per connection.
#[tokio::test]
async fn https_listener_tells_operator_from_site_certificates() {
    use fedee_proto::pki::{CertRequest, init_ca, issue};
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    init_ca(pki, "test", 1, false).unwrap();
    for (role, name) in [
        (Role::Aggregator, "aggregator"),
        (Role::Site, "Cleveland"),
        (Role::Operator, "ops"),
    ] {
        issue(
            pki,
            &CertRequest {
                role,
                name: name.into(),
                hosts: vec![],
                valid_from_days: 0,
                days: 1,
            },
            false,
        )
        .unwrap();
    }
    let store = Store::connect("sqlite::memory:").await.unwrap();
    seed(&store).await;
    let https = fedee_proto::pki::TlsFiles::in_dir(pki, "aggregator")
        .https_server_config()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let d = Dashboard::new(store, Metrics::new(), info(), None, true);
    let server = tokio::spawn(dashboard::serve(d, listener, Some(https), shutdown.clone()));
    assert_eq!(
        https_status(addr, pki, Some("ops"), "/api/overview").await,
        200
    );
    assert_eq!(
        https_status(addr, pki, Some("Cleveland"), "/api/overview").await,
        403
    );
    assert_eq!(https_status(addr, pki, None, "/api/overview").await, 401);
    shutdown.cancel();
    server.await.unwrap().unwrap();
}

/// ChromeDriver on a free port, killed on drop.
struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Debian's ChromeDriver, or `None` (with a note) where it is not installed outside CI; in
/// CI (`CI` set) a missing browser fails the test (`make test` installs it).
fn chromedriver() -> Option<Driver> {
    let found = ["chromedriver", "chromium"].iter().all(|b| {
        std::process::Command::new("sh")
            .args(["-c", &format!("command -v {b}")])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !found {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the browser test: chromium and chromedriver are missing (make test installs them: scripts/browser.sh)"
        );
        eprintln!(
            "note: chromium/chromedriver missing: the browser test did not run (make test installs them)"
        );
        return None;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed().as_secs() < 20, "chromedriver did not start");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Some(Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    })
}

/// A real aggregator with three real sites (the heart-disease spec, 3 rounds), watched in
/// headless Chromium over WebDriver: the sign-in works, each round closing reaches the open
/// page within 5 s without a reload, the privacy chart has one series per site; a screenshot
/// lands in the test's output folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_browser_follows_a_live_federation() {
    use fantoccini::{ClientBuilder, Locator};
    use std::time::{Duration, Instant};
    let Some(driver) = chromedriver() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    common::spec_and_model(
        dir,
        &common::heart_spec(&[("rounds = 10\n", "rounds = 3\n")]),
    );
    let out = common::fedee(&["certs", "dashboard-token", "--out", "token.sha256"], dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert_eq!(token.len(), 64);
    let agg = common::Aggregator::start(
        dir,
        "127.0.0.1:0",
        &[
            "--insecure",
            "--spec",
            "federation.toml",
            "--initial-model",
            "g0.safetensors",
            "--database-url",
            "sqlite://agg.db?mode=rwc",
            "--blob-dir",
            "blobs",
            "--dashboard-listen",
            "127.0.0.1:0",
            "--dashboard-token-hash",
            "token.sha256",
        ],
    );
    agg.wait_for_log("dashboard at http://", Duration::from_secs(20));
    let log = agg.log();
    let base = log
        .split("dashboard at ")
        .nth(1)
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .trim_end_matches('/')
        .to_owned();

    let profile = tempfile::tempdir().unwrap();
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=1280,1400",
                format!("--user-data-dir={}", profile.path().display()),
            ]
        }),
    );
    let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a WebDriver session in headless Chromium");

    // Without credentials the page is the sign-in form; the token signs in.
    c.goto(&format!("{base}/")).await.unwrap();
    let field = c.find(Locator::Css("input[name=token]")).await.unwrap();
    field.send_keys(&token).await.unwrap();
    c.find(Locator::Css("button[type=submit]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    c.wait()
        .for_element(Locator::Css("#round"))
        .await
        .expect("the overview after signing in");
    // A mark that a reload would erase.
    c.execute("document.body.dataset.mark = 'kept'; return true;", vec![])
        .await
        .unwrap();
    // The live connection is up before the sites start.
    let t = Instant::now();
    while c.find(Locator::Css("#live.on")).await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the event stream never opened"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let csv = common::heart_csv();
    let mut children = Vec::new();
    for name in ["Cleveland", "Hungary", "Switzerland"] {
        children.push(
            std::process::Command::new(env!("CARGO_BIN_EXE_fedee"))
                .args([
                    "site",
                    "--insecure",
                    "--aggregator",
                    &agg.addr,
                    "--site",
                    name,
                ])
                .arg("--data")
                .arg(&csv)
                .args(["--where", &format!("dataset={name}")])
                .args(["--ledger", &format!("{name}.ledger.json"), "--new-ledger"])
                .env("FEDEE_LOG", "warn")
                .current_dir(dir)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
    }

    // Each round closing reaches the page within 5 s of the aggregator logging it.
    let mut delays = Vec::new();
    for round in 1..=3u32 {
        let needle = format!("round={round} ");
        let t0 = loop {
            let log = agg.log();
            if log
                .lines()
                .any(|l| l.contains("round closed") && l.contains(&needle))
            {
                break Instant::now();
            }
            assert!(!log.contains("round failed"), "a round failed:\n{log}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let css = format!("tr[data-round='{round}'][data-state='closed']");
        while c.find(Locator::Css(&css)).await.is_err() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "round {round} closed in the log but not on the page within 5 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        delays.push(t0.elapsed());
    }
    let mark = c
        .execute("return document.body.dataset.mark || null;", vec![])
        .await
        .unwrap();
    assert_eq!(mark, serde_json::json!("kept"), "the page was reloaded");
    let latencies = c
        .execute("return window.fedeeLatencies || [];", vec![])
        .await
        .unwrap();
    let mut ms: Vec<f64> = latencies
        .as_array()
        .unwrap()
        .iter()
        .filter_map(serde_json::Value::as_f64)
        .collect();
    assert!(!ms.is_empty(), "no event reached the page");
    ms.sort_by(f64::total_cmp);
    eprintln!(
        "dashboard: {} events shown; event-to-DOM latency median {:.0} ms, p95 {:.0} ms, max {:.0} ms; round close to page (polled every 20 ms): {:?}",
        ms.len(),
        ms[ms.len() / 2],
        ms[(ms.len() * 95 / 100).min(ms.len() - 1)],
        ms[ms.len() - 1],
        delays
    );
    for mut child in children {
        let status = child.wait().unwrap();
        assert!(status.success(), "a site failed");
    }

    // The privacy chart: one series per site.
    c.goto(&format!("{base}/privacy")).await.unwrap();
    c.wait()
        .for_element(Locator::Css("#privacy-chart"))
        .await
        .unwrap();
    let series = c
        .find_all(Locator::Css("#privacy-chart polyline.series"))
        .await
        .unwrap();
    let mut names = Vec::new();
    for s in &series {
        names.push(s.attr("data-series").await.unwrap().unwrap());
    }
    names.sort();
    assert_eq!(names, ["Cleveland", "Hungary", "Switzerland"]);
    for page in ["privacy", "accuracy", "updates", ""] {
        c.goto(&format!("{base}/{page}")).await.unwrap();
        c.wait().for_element(Locator::Css("main h1")).await.unwrap();
        let png = c.screenshot().await.unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let name = if page.is_empty() { "overview" } else { page };
        let shot =
            std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("dashboard-{name}.png"));
        std::fs::write(&shot, &png).unwrap();
        eprintln!("dashboard: screenshot {}", shot.display());
    }
    c.close().await.unwrap();
}
