//! The operator's dashboard: a live, read-only web view of the federation served by the
//! aggregator (`fedee aggregator --dashboard-listen ADDR`).
//!
//! | path | what |
//! |---|---|
//! | `/` | overview: spec, round and stage, deadline countdown, quorum, sites, last rounds |
//! | `/accuracy` | each metric the sites report, per site and weighted, over rounds |
//! | `/privacy` | ε spent per site against the planned budget; the federation's ρ and ε |
//! | `/updates` | accepted and rejected updates (by reason), bytes, round durations, failures |
//! | `/api/overview`, `/api/accuracy`, `/api/privacy`, `/api/updates` | each page's data as JSON |
//! | `/events` | server-sent events (`event: update`, data: [`crate::metrics::Event`] JSON) |
//! | `/login` | the token sign-in form (`POST` sets an `HttpOnly`, `SameSite=Strict` cookie) |
//!
//! A page fetches `?fragment=main` of itself when an event arrives, so it follows the
//! federation within a second without reloading.
//!
//! # Security
//! Read-only: no handler changes the federation. Access needs either an operator client
//! certificate from the consortium CA (HTTPS when the aggregator runs with TLS; any other
//! role's certificate is refused with 403, even with a token) or the bearer token whose
//! SHA-256 the aggregator was given (`Authorization: Bearer T` or the sign-in cookie);
//! without them, 401. The token itself is never stored. Per-site figures (metrics, ε, reasons
//! for leaving) are shown, as `fedee status` shows them to operators. Every response carries
//! a strict Content-Security-Policy (scripts and styles from this origin only, no inline
//! code), `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer` and
//! `Cache-Control: no-store`; every value on a page is HTML-escaped by the templates.

pub mod data;
pub mod page;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Json, Router};
use fedee_proto::pki::{PeerIdentity, Role};
use futures::Stream;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::AggregatorError;
use crate::metrics::Metrics;
use crate::store::Store;

/// The strict Content-Security-Policy of every response.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";
/// The sign-in cookie's name.
pub const COOKIE: &str = "fedee_dashboard";

const JS: &str = include_str!("dashboard.js");
const CSS: &str = include_str!("dashboard.css");

/// What the dashboard serves from.
#[derive(Clone)]
pub struct Dashboard {
    store: Store,
    metrics: Metrics,
    info: Arc<data::Info>,
    /// SHA-256 of the bearer token, if one is accepted.
    token_sha256: Option<[u8; 32]>,
    /// Whether the listener speaks TLS (the cookie is then `Secure`).
    tls: bool,
    /// Ends the event streams (so a graceful shutdown does not wait for open pages).
    shutdown: CancellationToken,
}

/// The client certificate a connection presented, if any.
#[derive(Debug, Clone, Default)]
pub struct Peer(pub Option<PeerIdentity>);

impl Dashboard {
    /// A dashboard over `store`, following `metrics`' events.
    pub fn new(
        store: Store,
        metrics: Metrics,
        info: data::Info,
        token_sha256: Option<[u8; 32]>,
        tls: bool,
    ) -> Self {
        Self {
            store,
            metrics,
            info: Arc::new(info),
            token_sha256,
            tls,
            shutdown: CancellationToken::new(),
        }
    }

    /// Every route, with authentication and the security headers. Handlers read the
    /// connection's certificate from a [`Peer`] extension (absent: none presented).
    pub fn router(self) -> Router {
        let protected = Router::new()
            .route("/", get(overview_page))
            .route("/accuracy", get(accuracy_page))
            .route("/privacy", get(privacy_page))
            .route("/updates", get(updates_page))
            .route("/api/overview", get(overview_api))
            .route("/api/accuracy", get(accuracy_api))
            .route("/api/privacy", get(privacy_api))
            .route("/api/updates", get(updates_api))
            .route("/events", get(events))
            .route_layer(middleware::from_fn_with_state(self.clone(), authenticate));
        Router::new()
            .merge(protected)
            .route("/login", get(login_form).post(login))
            .route(
                "/static/dashboard.js",
                get(|| async {
                    (
                        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                        JS,
                    )
                }),
            )
            .route(
                "/static/dashboard.css",
                get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS) }),
            )
            .layer(middleware::from_fn(security_headers))
            .with_state(self)
    }
}

/// SHA-256 of a token, as the aggregator stores it.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.trim().as_bytes()).into()
}

/// Read a token hash file (64 hex digits, as [`new_token`] writes).
///
/// # Errors
/// [`AggregatorError::Config`] naming the file when it cannot be read or holds no hash.
pub fn read_token_hash(path: &Path) -> Result<[u8; 32], AggregatorError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        AggregatorError::Config(format!(
            "cannot read the dashboard token hash {}: {e} (make one with `fedee certs dashboard-token --out {}`)",
            path.display(),
            path.display()
        ))
    })?;
    hex::decode(text.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
        .ok_or_else(|| {
            AggregatorError::Config(format!(
                "{} does not hold a SHA-256 in hex (64 digits): make it with `fedee certs dashboard-token`",
                path.display()
            ))
        })
}

/// A fresh random token (256 bits, hex); its SHA-256 is written to `hash_file` (mode 0600,
/// never replaced unless `force`). The token itself is returned, never stored.
///
/// # Errors
/// The file exists (without `force`) or cannot be written; the OS random source failing.
pub fn new_token(hash_file: &Path, force: bool) -> anyhow::Result<String> {
    use rand::TryRngCore;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng
        .try_fill_bytes(&mut raw)
        .map_err(|e| anyhow::anyhow!("the operating system's random source failed: {e}"))?;
    let token = hex::encode(raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(0o600);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(hash_file).map_err(|e| {
        anyhow::anyhow!(
            "cannot create {}: {e}{}",
            hash_file.display(),
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                " (pass --force to replace it: the old token stops working)"
            } else {
                ""
            }
        )
    })?;
    writeln!(f, "{}", hex::encode(token_hash(&token)))?;
    f.sync_all()?;
    Ok(token)
}

fn presented_token(headers: &HeaderMap) -> Option<String> {
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| {
            c.trim()
                .strip_prefix(&format!("{COOKIE}="))
                .map(str::to_owned)
        })
}

impl Dashboard {
    fn token_ok(&self, token: &str) -> bool {
        self.token_sha256
            .is_some_and(|h| bool::from(h.ct_eq(&token_hash(token))))
    }
}

fn refusal(status: StatusCode, wants_html: bool, message: &str) -> Response {
    if wants_html && status == StatusCode::UNAUTHORIZED {
        return (status, Html(page::login(None).into_string())).into_response();
    }
    let mut r = (
        status,
        Json(serde_json::json!({ "error": { "code": status.as_u16(), "message": message } })),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

async fn authenticate(State(d): State<Dashboard>, req: Request, next: Next) -> Response {
    let peer = req
        .extensions()
        .get::<ConnectInfo<Peer>>()
        .map(|c| c.0.clone())
        .unwrap_or_default();
    let wants_html = !(req.uri().path().starts_with("/api/") || req.uri().path() == "/events");
    match &peer.0 {
        Some(p) if p.role == Role::Operator => return next.run(req).await,
        Some(p) => {
            tracing::warn!(name = %p.name, role = p.role.as_str(), "dashboard refused a non-operator certificate");
            return refusal(
                StatusCode::FORBIDDEN,
                false,
                &format!(
                    "a {} certificate cannot open the dashboard: use an operator certificate (fedee certs issue --operator NAME) or the dashboard token",
                    p.role.as_str()
                ),
            );
        }
        None => {}
    }
    match presented_token(req.headers()) {
        Some(t) if d.token_ok(&t) => next.run(req).await,
        Some(_) => refusal(
            StatusCode::UNAUTHORIZED,
            wants_html,
            "the dashboard token is not valid",
        ),
        None => refusal(
            StatusCode::UNAUTHORIZED,
            wants_html,
            "sign in: an operator certificate, or `Authorization: Bearer TOKEN` (fedee certs dashboard-token)",
        ),
    }
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

#[derive(serde::Deserialize)]
struct Token {
    token: String,
}

async fn login_form() -> Html<String> {
    Html(page::login(None).into_string())
}

async fn login(State(d): State<Dashboard>, Form(f): Form<Token>) -> Response {
    if !d.token_ok(&f.token) {
        tracing::warn!("dashboard sign-in with a wrong token");
        return (
            StatusCode::UNAUTHORIZED,
            Html(page::login(Some("That token is not valid.")).into_string()),
        )
            .into_response();
    }
    let cookie = format!(
        "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
        f.token.trim(),
        if d.tls { "; Secure" } else { "" }
    );
    let mut r = Redirect::to("/").into_response();
    match HeaderValue::from_str(&cookie) {
        Ok(v) => {
            r.headers_mut().insert(header::SET_COOKIE, v);
            r
        }
        Err(_) => refusal(
            StatusCode::BAD_REQUEST,
            false,
            "a token of printable characters",
        ),
    }
}

/// `?fragment=main`: only the page's `<main>` content (what the live script swaps in).
#[derive(serde::Deserialize)]
struct View {
    fragment: Option<String>,
}

fn failure(e: &AggregatorError) -> Response {
    tracing::error!(error = %e, "dashboard could not read the database");
    refusal(
        StatusCode::SERVICE_UNAVAILABLE,
        false,
        "the aggregator's database could not be read; retry",
    )
}

fn render(path: &str, view: &View, main: maud::Markup) -> Response {
    if view.fragment.as_deref() == Some("main") {
        return Html(main.into_string()).into_response();
    }
    let title = page::PAGES
        .iter()
        .find(|p| p.0 == path)
        .map_or("fedee", |p| p.1);
    Html(page::layout(path, title, crate::store::now_ms(), main).into_string()).into_response()
}

async fn overview_page(State(d): State<Dashboard>, Query(v): Query<View>) -> Response {
    match data::overview(&d.store, &d.info).await {
        Ok(o) => render("/", &v, page::overview(&o)),
        Err(e) => failure(&e),
    }
}

async fn accuracy_page(State(d): State<Dashboard>, Query(v): Query<View>) -> Response {
    match data::accuracy(&d.store).await {
        Ok(a) => render("/accuracy", &v, page::accuracy(&a)),
        Err(e) => failure(&e),
    }
}

async fn privacy_page(State(d): State<Dashboard>, Query(v): Query<View>) -> Response {
    match data::privacy(&d.store, &d.info).await {
        Ok(p) => render("/privacy", &v, page::privacy(&p)),
        Err(e) => failure(&e),
    }
}

async fn updates_page(State(d): State<Dashboard>, Query(v): Query<View>) -> Response {
    match data::updates(&d.store).await {
        Ok(u) => render("/updates", &v, page::updates(&u)),
        Err(e) => failure(&e),
    }
}

fn json<T: serde::Serialize>(r: Result<T, AggregatorError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => failure(&e),
    }
}

async fn overview_api(State(d): State<Dashboard>) -> Response {
    json(data::overview(&d.store, &d.info).await)
}

async fn accuracy_api(State(d): State<Dashboard>) -> Response {
    json(data::accuracy(&d.store).await)
}

async fn privacy_api(State(d): State<Dashboard>) -> Response {
    json(data::privacy(&d.store, &d.info).await)
}

async fn updates_api(State(d): State<Dashboard>) -> Response {
    json(data::updates(&d.store).await)
}

async fn events(
    State(d): State<Dashboard>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    use futures::StreamExt;
    let rx = d.metrics.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let ev = SseEvent::default()
                        .event("update")
                        .id(e.seq.to_string())
                        .json_data(&e)
                        .unwrap_or_else(|_| SseEvent::default().event("update"));
                    return Some((Ok(ev), rx));
                }
                // Fell behind: the page re-reads everything on the next event anyway.
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
    .take_until(d.shutdown.cancelled_owned());
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// HTTPS connections whose client certificate (if any) was verified by the consortium CA.
pub struct TlsListener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

/// Seconds a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (tcp, addr) = match self.tcp.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "dashboard accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => return (tls, addr),
                Ok(Err(e)) => tracing::debug!(%addr, error = %e, "dashboard TLS handshake failed"),
                Err(_) => tracing::debug!(%addr, "dashboard TLS handshake timed out"),
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>> for Peer {
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        let (_, conn) = s.io().get_ref();
        Peer(
            conn.peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| fedee_proto::pki::identity_of(c.as_ref()).ok()),
        )
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TcpListener>> for Peer {
    fn connect_info(_: axum::serve::IncomingStream<'_, TcpListener>) -> Self {
        Peer(None)
    }
}

/// Serve `dashboard` on `listener` until `shutdown`: HTTPS with `tls` (client certificates
/// optional, verified by the consortium CA), else plain HTTP (token only).
///
/// # Errors
/// IO errors of the server.
pub async fn serve(
    dashboard: Dashboard,
    listener: TcpListener,
    tls: Option<rustls::ServerConfig>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Dashboard {
        shutdown: shutdown.clone(),
        ..dashboard
    }
    .router();
    match tls {
        Some(config) => {
            let l = TlsListener {
                tcp: listener,
                acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            };
            axum::serve(l, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
        None => {
            axum::serve(listener, app.into_make_service_with_connect_info::<Peer>())
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    }
}
