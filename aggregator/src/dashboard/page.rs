//! The dashboard's HTML, rendered on the server with `maud` (compile-time templates that
//! escape every interpolated value: site names come from certificates and rejection reasons
//! from the wire). Charts are inline SVG drawn here; the page loads only `/static/` files
//! from this binary, so it works offline and under a strict Content-Security-Policy.

use maud::{DOCTYPE, Markup, html};

use super::data::{Accuracy, Info, MAX_POINTS, Overview, Privacy, RoundSummary, Series, Updates};

/// The pages, in the navigation's order: path, title.
pub const PAGES: [(&str, &str); 4] = [
    ("/", "Overview"),
    ("/accuracy", "Accuracy"),
    ("/privacy", "Privacy"),
    ("/updates", "Updates"),
];

/// Series named in a chart's legend at most.
const MAX_LEGEND: usize = 24;
const PALETTE: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A whole page: the layout around `main`.
pub fn layout(path: &str, title: &str, now_ms: i64, main: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · fedee" }
                link rel="stylesheet" href="/static/dashboard.css";
                script src="/static/dashboard.js" defer {}
            }
            body data-now-ms=(now_ms) {
                header {
                    span.brand { "fedee" }
                    nav {
                        @for (href, name) in PAGES {
                            a href=(href) class=[(href == path).then_some("here")] { (name) }
                        }
                    }
                    span #live .live { "connecting…" }
                }
                main #main { (main) }
            }
        }
    }
}

/// The login form (`POST /login`), with `error` above it when a token was refused.
pub fn login(error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                title { "Sign in · fedee" }
                link rel="stylesheet" href="/static/dashboard.css";
            }
            body {
                main.login {
                    h1 { "fedee dashboard" }
                    p { "Sign in with the dashboard token (" code { "fedee certs dashboard-token" } "), or open this page with an operator certificate." }
                    @if let Some(e) = error { p.error { (e) } }
                    form method="post" action="/login" {
                        label for="token" { "Token" }
                        input #token type="password" name="token" autocomplete="current-password" required;
                        button type="submit" { "Sign in" }
                    }
                }
            }
        }
    }
}

fn info_line(i: &Info) -> Markup {
    html! {
        p.spec {
            (i.summary)
            @if !i.spec_sha256.is_empty() {
                " · spec " code { (i.spec_sha256.get(..12).unwrap_or(&i.spec_sha256)) }
            }
            @if i.secure_aggregation { " · secure aggregation" }
        }
    }
}

fn seconds(s: i64) -> String {
    match s {
        s if s >= 3600 => format!("{} h {} min", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}

fn bytes(b: u64) -> String {
    match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b if b >= 1 << 10 => format!("{:.1} KiB", b as f64 / 1024.0),
        b => format!("{b} B"),
    }
}

fn epsilon(e: Option<f64>) -> String {
    e.map_or_else(|| "–".into(), |e| format!("{e:.4}"))
}

fn rounds_table(rounds: &[RoundSummary], caption: &str) -> Markup {
    html! {
        table.rounds {
            caption { (caption) }
            thead { tr { th { "round" } th { "outcome" } th { "duration" } th { "updates" } th { "bytes" } th { "ε" } th { "why / affected sites" } } }
            tbody {
                @for r in rounds {
                    tr data-round=(r.round) data-state=(r.state) {
                        td { (r.round) }
                        td { span class=(format!("state {}", r.state)) { (r.state) } }
                        td { (r.duration_s.map(seconds).unwrap_or_else(|| "–".into())) }
                        td { (r.updates) }
                        td { (bytes(r.bytes)) }
                        td { (epsilon(r.epsilon)) }
                        td {
                            @if let Some(why) = &r.reason { (why) }
                            @if !r.missing.is_empty() { " (no update from " (r.missing.join(", ")) ")" }
                        }
                    }
                }
            }
        }
    }
}

/// The overview's content.
pub fn overview(o: &Overview) -> Markup {
    html! {
        h1 { "Federation" }
        (info_line(&o.info))
        section.cards {
            div.card #round {
                div.label { "round" }
                div.value {
                    (o.current_round.or(o.recent_rounds.first().map(|r| r.round)).map_or_else(|| "–".into(), |r| r.to_string()))
                    " / " (o.info.rounds)
                }
                div.sub { (o.stage) }
            }
            div.card #deadline {
                div.label { "deadline" }
                div.value {
                    @if let Some(d) = o.deadline_ms {
                        span data-deadline-ms=(d) { (seconds(((d - o.now_ms) / 1000).max(0))) }
                    } @else { "–" }
                }
                div.sub { "round timeout " (seconds(o.info.round_timeout_s as i64)) }
            }
            div.card #quorum {
                div.label { "quorum" }
                div.value { (o.submitted) " / " (o.info.min_sites) }
                div.sub { "updates in the open round" }
            }
            div.card #sites {
                div.label { "sites" }
                div.value { (o.joined) }
                div.sub { (o.submitted) " submitted · " (o.departed) " departed" }
            }
        }
        h2 { "Sites" }
        table.sites {
            thead { tr { th { "site" } th { "open round" } th { "departed" } } }
            tbody {
                @for s in &o.sites {
                    tr data-site=(s.name) {
                        td { (s.name) }
                        td {
                            @if o.current_round.is_none() { "–" }
                            @else if s.submitted { "update received" }
                            @else if s.departed.is_some() { "left" }
                            @else { "waiting" }
                        }
                        td { (s.departed.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
        h2 { "Last rounds" }
        (rounds_table(&o.recent_rounds, "newest first"))
    }
}

/// Thin `points` to at most [`MAX_POINTS`], evenly, keeping the first and the last.
fn thin(points: &[(u32, f64)]) -> Vec<(u32, f64)> {
    let max = MAX_POINTS as usize;
    if points.len() <= max {
        return points.to_vec();
    }
    let step = points.len().div_ceil(max);
    let mut out: Vec<(u32, f64)> = points.iter().step_by(step).copied().collect();
    if out.last() != points.last() {
        out.extend(points.last());
    }
    out
}

/// A line chart of `series` over rounds (inline SVG, 720 × 260 user units): one
/// `polyline.series` per series with `data-series` = its name, an optional dashed
/// horizontal line, and a legend.
pub fn line_chart(
    id: &str,
    y_label: &str,
    series: &[&Series],
    hline: Option<(f64, &str)>,
) -> Markup {
    const W: f64 = 720.0;
    const H: f64 = 260.0;
    const L: f64 = 56.0;
    const R: f64 = 12.0;
    const T: f64 = 12.0;
    const B: f64 = 32.0;
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (u32::MAX, 0u32, 0f64, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        if y.is_finite() {
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
    }
    if let Some((v, _)) = hline {
        y1 = y1.max(v);
    }
    if x0 > x1 {
        return html! { p.empty #(id) { "no data yet" } };
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let y1 = y1 * 1.05;
    let sx = |x: u32| {
        L + (W - L - R)
            * if x1 > x0 {
                f64::from(x - x0) / f64::from(x1 - x0)
            } else {
                0.5
            }
    };
    let sy = |y: f64| T + (H - T - B) * (1.0 - (y - y0) / (y1 - y0));
    let ticks: Vec<f64> = (0..=4)
        .map(|i| y0 + (y1 - y0) * f64::from(i) / 4.0)
        .collect();
    html! {
        figure.chart #(id) data-series-count=(series.len()) {
            svg viewBox=(format!("0 0 {W} {H}")) role="img" aria-label=(y_label) {
                @for t in &ticks {
                    line.grid x1=(L) x2=(W - R) y1=(format!("{:.1}", sy(*t))) y2=(format!("{:.1}", sy(*t))) {}
                    text.tick x=(L - 6.0) y=(format!("{:.1}", sy(*t) + 4.0)) text-anchor="end" { (format!("{t:.3}")) }
                }
                text.tick x=(L) y=(H - 10.0) { "round " (x0) }
                text.tick x=(W - R) y=(H - 10.0) text-anchor="end" { "round " (x1) }
                @if let Some((v, label)) = hline {
                    line.budget x1=(L) x2=(W - R) y1=(format!("{:.1}", sy(v))) y2=(format!("{:.1}", sy(v))) {}
                    text.tick x=(W - R) y=(format!("{:.1}", sy(v) - 4.0)) text-anchor="end" { (label) }
                }
                @for (i, s) in series.iter().enumerate() {
                    @let pts = thin(&s.points).iter().filter(|p| p.1.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect::<Vec<_>>().join(" ");
                    @let weighted = s.name == "weighted";
                    polyline.series.weighted[weighted] data-series=(s.name) fill="none"
                        stroke=(if weighted { "#000" } else { PALETTE[i % PALETTE.len()] })
                        stroke-width=(if weighted { "2.5" } else { "1.2" }) points=(pts) {
                        title { (s.name) }
                    }
                }
            }
            figcaption {
                (y_label)
                @if series.len() <= MAX_LEGEND {
                    ul.legend {
                        @for (i, s) in series.iter().enumerate() {
                            li {
                                svg.swatch viewBox="0 0 10 10" { rect width="10" height="10" fill=(if s.name == "weighted" { "#000" } else { PALETTE[i % PALETTE.len()] }) {} }
                                (s.name)
                            }
                        }
                    }
                } @else {
                    " · " (series.len()) " series (hover a line for its site)"
                }
            }
        }
    }
}

/// The accuracy page's content.
pub fn accuracy(a: &Accuracy) -> Markup {
    html! {
        h1 { "Accuracy" }
        p { "Each global model as the sites evaluated it on their own test (validation) splits; round r is the model round r produced (round 0: the initial model). The black line is weighted by the sites' examples." }
        @if a.charts.is_empty() { p.empty { "no site has reported metrics yet" } }
        @for (i, c) in a.charts.iter().enumerate() {
            h2 { (c.metric) }
            @let lines: Vec<&Series> = c.sites.iter().chain(std::iter::once(&c.weighted)).collect();
            (line_chart(&format!("metric-{i}"), &c.metric, &lines, None))
            table {
                thead { tr { th { "site" } th { "latest round" } th { (c.metric) } } }
                tbody {
                    @for s in lines {
                        @if let Some((r, v)) = s.points.last() {
                            tr { td { (s.name) } td { (r) } td { (format!("{v:.4}")) } }
                        }
                    }
                }
            }
        }
    }
}

/// The privacy page's content.
pub fn privacy(p: &Privacy) -> Markup {
    let i = &p.info;
    let sites: Vec<&Series> = p.sites.iter().collect();
    html! {
        h1 { "Privacy" }
        p {
            "Unit of privacy: " strong { (i.privacy_unit) } " (" (i.dp_mode) " mode); ε at δ = " (format!("{:e}", i.delta))
            ". Planned: up to ε = " (format!("{:.4}", i.planned_epsilon)) " per site over " (i.rounds) " rounds (start refused above " (format!("{}", i.max_epsilon)) ")."
        }
        h2 { "ε spent per site" }
        p.note { "From " (p.source) "." }
        (line_chart("privacy-chart", "ε per site", &sites, Some((i.planned_epsilon, "planned ε"))))
        @if !p.budget_departures.is_empty() {
            h2 { "Departures because of budget" }
            ul { @for (s, why) in &p.budget_departures { li { strong { (s) } ": " (why) } } }
        }
        h2 { "Federation" }
        table {
            thead { tr { th { "round" } th { "zCDP ρ" } th { "ε" } } }
            tbody {
                @for r in p.federation.iter().rev().take(20) {
                    tr { td { (r.round) } td { @if r.rho > 0.0 { (format!("{:.4}", r.rho)) } @else { "–" } } td { (format!("{:.4}", r.epsilon)) } }
                }
            }
        }
    }
}

/// The updates page's content.
pub fn updates(u: &Updates) -> Markup {
    let durations = Series {
        name: "round duration (s)".into(),
        points: u
            .rounds
            .iter()
            .filter_map(|r| r.duration_s.map(|d| (r.round, d as f64)))
            .collect(),
    };
    let recent: Vec<RoundSummary> = u.rounds.iter().rev().take(20).cloned().collect();
    html! {
        h1 { "Updates" }
        section.cards {
            div.card { div.label { "accepted" } div.value #accepted { (u.accepted) } div.sub { (bytes(u.bytes)) } }
            div.card { div.label { "rejected" } div.value #rejected { (u.rejected_by_reason.iter().map(|r| r.1).sum::<u64>()) } div.sub { "all rounds" } }
        }
        h2 { "Round duration" }
        (line_chart("duration-chart", "seconds from opening to close", &[&durations], None))
        (rounds_table(&recent, "last 20 rounds, newest first"))
        h2 { "Rejected, by reason" }
        table.rejections {
            thead { tr { th { "reason" } th { "updates" } } }
            tbody { @for (k, n) in &u.rejected_by_reason { tr { td { (k) } td { (n) } } } }
        }
        h2 { "Latest rejections" }
        table {
            thead { tr { th { "round" } th { "site" } th { "reason" } th { "error" } } }
            tbody {
                @for r in &u.recent_rejections {
                    tr {
                        td { (r.round.map(|v| v.to_string()).unwrap_or_default()) }
                        td { (r.site.as_deref().unwrap_or("")) }
                        td { (r.kind.as_deref().unwrap_or("")) }
                        td { (r.reason) }
                    }
                }
            }
        }
        h2 { "Failures" }
        @if u.failures.is_empty() { p.empty { "no round has failed" } }
        @else { (rounds_table(&u.failures, "failed rounds, newest first")) }
    }
}
