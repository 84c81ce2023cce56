//! A hostile aggregator: a test double speaking the real `fedee.v1` protocol that serves a
//! spec and tasks of its choosing, against the real site agent. The site must refuse what
//! its own privacy policy or the spec it agreed to do not allow: σ = 0, δ ≥ 1, a NaN σ, a σ
//! changed mid-federation, a spec whose δ or target ε passes the site's limits. It refuses
//! before joining (spec) or before training (task), leaves naming why, and sends no update.

use std::collections::VecDeque;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedee_proto::v1::federation_server::{Federation, FederationServer};
use fedee_proto::v1::{
    Chunk, DownloadModelRequest, GetSpecRequest, JoinRequest, JoinResponse, LeaveRequest,
    LeaveResponse, MetricsAck, MetricsReport, NextTaskRequest, SpecResponse, StatisticsRequest,
    StatisticsResponse, StatusRequest, StatusResponse, SubmitUpdateMessage, SubmitUpdateResponse,
    Task, TaskKind, submit_update_message,
};
use fedee_site_agent::policy::PrivacyPolicy;
use fedee_site_agent::{SiteConfig, SiteError};
use futures::StreamExt;
use tonic::{Request, Response, Status, Streaming};

/// What the hostile aggregator saw the site do.
#[derive(Debug, Default)]
struct Seen {
    joined: bool,
    updates: Vec<u32>,
    left: Option<String>,
    /// Secure-aggregation messages received.
    secagg: usize,
}

struct Hostile {
    spec: fedee_spec::SignedSpec,
    model: Vec<u8>,
    tasks: Mutex<VecDeque<Task>>,
    seen: Arc<Mutex<Seen>>,
}

type ChunkStream = Pin<Box<dyn futures::Stream<Item = Result<Chunk, Status>> + Send>>;

#[tonic::async_trait]
impl Federation for Hostile {
    async fn get_spec(&self, _: Request<GetSpecRequest>) -> Result<Response<SpecResponse>, Status> {
        Ok(Response::new(SpecResponse {
            toml: self.spec.text.clone(),
            sha256: self.spec.sha256.clone(),
        }))
    }
    async fn join(&self, r: Request<JoinRequest>) -> Result<Response<JoinResponse>, Status> {
        self.seen.lock().unwrap().joined = true;
        Ok(Response::new(JoinResponse {
            site: r.into_inner().site,
            min_sites: 1,
            total_rounds: self.spec.spec.federation.rounds,
            spec_sha256: self.spec.sha256.clone(),
        }))
    }
    async fn submit_statistics(
        &self,
        _: Request<StatisticsRequest>,
    ) -> Result<Response<StatisticsResponse>, Status> {
        Err(Status::unimplemented("no statistics round here"))
    }
    async fn next_task(&self, _: Request<NextTaskRequest>) -> Result<Response<Task>, Status> {
        let t = self.tasks.lock().unwrap().pop_front();
        Ok(Response::new(t.unwrap_or(Task {
            kind: TaskKind::Done as i32,
            round: 3,
            ..Task::default()
        })))
    }
    type DownloadModelStream = ChunkStream;
    async fn download_model(
        &self,
        _: Request<DownloadModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let chunks = fedee_proto::chunks(&self.model);
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks.into_iter().map(Ok),
        ))))
    }
    async fn submit_update(
        &self,
        r: Request<Streaming<SubmitUpdateMessage>>,
    ) -> Result<Response<SubmitUpdateResponse>, Status> {
        let mut s = r.into_inner();
        let mut round = 0;
        while let Some(m) = s.next().await {
            if let Some(submit_update_message::Msg::Header(h)) = m?.msg {
                round = h.round;
            }
        }
        self.seen.lock().unwrap().updates.push(round);
        Ok(Response::new(SubmitUpdateResponse {
            round,
            updates_in_round: 1,
        }))
    }
    async fn report_metrics(
        &self,
        _: Request<MetricsReport>,
    ) -> Result<Response<MetricsAck>, Status> {
        Ok(Response::new(MetricsAck {}))
    }
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(StatusResponse::default()))
    }
    async fn secure_aggregation(
        &self,
        _: Request<fedee_proto::v1::SecAggRequest>,
    ) -> Result<Response<fedee_proto::v1::SecAggResponse>, Status> {
        self.seen.lock().unwrap().secagg += 1;
        Err(Status::unimplemented("no secure aggregation here"))
    }
    async fn submit_masked(
        &self,
        _: Request<Streaming<fedee_proto::v1::SubmitMaskedMessage>>,
    ) -> Result<Response<fedee_proto::v1::SecAggResponse>, Status> {
        self.seen.lock().unwrap().secagg += 1;
        Err(Status::unimplemented("no secure aggregation here"))
    }
    async fn leave(&self, r: Request<LeaveRequest>) -> Result<Response<LeaveResponse>, Status> {
        self.seen.lock().unwrap().left = Some(r.into_inner().reason);
        Ok(Response::new(LeaveResponse {
            federation_ended: false,
        }))
    }
}

/// A small tabular spec in site mode (σ = 1, C = 1, δ = 1e-5, 2 rounds), edited by `edit`.
fn spec_text(edit: (&str, &str)) -> String {
    let text = r#"version = 1
[task]
kind = "tabular-classification"
label = "y"
classes = ["0", "1"]
[[features]]
name = "x"
type = "numeric"
[data]
validation_fraction = 0.0
test_fraction = 0.25
[model]
kind = "mlp"
hidden = [4]
[training]
epochs = 1
batch_size = 8
[federation]
rounds = 2
min_sites = 1
[privacy]
mode = "site"
clipping_norm = 1.0
noise_multiplier = 1.0
delta = 1e-5
"#;
    assert!(edit.0.is_empty() || text.contains(edit.0), "{}", edit.0);
    if edit.0.is_empty() {
        text.to_owned()
    } else {
        text.replacen(edit.0, edit.1, 1)
    }
}

/// A training task that agrees with [`spec_text`]'s defaults for `round`.
fn task(round: u32) -> Task {
    Task {
        kind: TaskKind::Train as i32,
        round,
        clipping_norm: 1.0,
        noise_multiplier: 1.0,
        local_epochs: 1,
        learning_rate: 0.1,
        batch_size: 8,
        dp_mode: "site".into(),
        delta: 1e-5,
        ..Task::default()
    }
}

fn data(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("site.csv");
    let mut s = String::from("x,y\n");
    for i in 0..200 {
        s += &format!("{},{}\n", i as f64 / 10.0, i % 2);
    }
    std::fs::write(&p, s).unwrap();
    p
}

/// Run the real site agent against a hostile aggregator serving `spec` and `tasks`.
async fn against(
    spec: &str,
    tasks: Vec<Task>,
    policy: PrivacyPolicy,
) -> (Result<fedee_site_agent::SiteReport, SiteError>, Seen) {
    let signed = fedee_spec::SignedSpec::parse(spec).unwrap();
    let model = fedee_model::state_to_safetensors(
        &fedee_site_agent::task::initial_model(&signed.spec, 0).unwrap(),
    )
    .unwrap();
    against_with_model(spec, tasks, policy, model).await
}

/// As [`against`], serving `model` as every global model.
async fn against_with_model(
    spec: &str,
    tasks: Vec<Task>,
    policy: PrivacyPolicy,
    model: Vec<u8>,
) -> (Result<fedee_site_agent::SiteReport, SiteError>, Seen) {
    let dir = tempfile::tempdir().unwrap();
    let signed = fedee_spec::SignedSpec::parse(spec).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let hostile = Hostile {
        spec: signed.clone(),
        model,
        tasks: Mutex::new(tasks.into()),
        seen: seen.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(FederationServer::new(hostile))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    let (task, _) =
        fedee_site_agent::task::from_spec(&signed.spec, &data(dir.path()), None, tch::Device::Cpu)
            .unwrap();
    let result = fedee_site_agent::run(SiteConfig {
        aggregator: format!("http://{addr}"),
        site: "North".into(),
        task,
        device: tch::Device::Cpu,
        seed: Some(1),
        poll_interval: Duration::from_millis(10),
        tls: None,
        retry: fedee_site_agent::client::Retry {
            attempts: 2,
            ..Default::default()
        },
        noise: fedee_dp::noise::Sampler::Fast,
        ledger: None,
        new_ledger: false,
        policy,
        spec: signed,
    })
    .await;
    server.abort();
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (result, seen)
}

fn refusal(r: Result<fedee_site_agent::SiteReport, SiteError>) -> String {
    match r {
        Err(e @ SiteError::Refused(_)) => e.to_string(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_honest_aggregator_gets_an_update_per_round() {
    let (r, seen) = against(
        &spec_text(("", "")),
        vec![task(1), task(2)],
        PrivacyPolicy::default(),
    )
    .await;
    let report = r.unwrap();
    assert_eq!(report.rounds_trained, vec![1, 2]);
    assert_eq!(seen.updates, vec![1, 2]);
    assert!(seen.left.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tasks_are_refused_before_training_and_the_site_leaves_naming_why() {
    let cases: Vec<(&str, Vec<Task>, &str)> = vec![
        (
            "σ = 0",
            vec![Task {
                noise_multiplier: 0.0,
                ..task(1)
            }],
            "noise_multiplier = 0",
        ),
        (
            "NaN σ",
            vec![Task {
                noise_multiplier: f64::NAN,
                ..task(1)
            }],
            "noise_multiplier = NaN",
        ),
        (
            "δ ≥ 1",
            vec![Task {
                delta: 1.0,
                ..task(1)
            }],
            "delta = 1",
        ),
        (
            "δ = 1e300",
            vec![Task {
                delta: 1e300,
                ..task(1)
            }],
            "delta = 1e300",
        ),
        (
            "σ changed in round 2",
            vec![
                task(1),
                Task {
                    noise_multiplier: 0.1,
                    ..task(2)
                },
            ],
            "round 2: the aggregator sent noise_multiplier = 0.1",
        ),
    ];
    for (what, tasks, needle) in cases {
        let changed_later = tasks.len() > 1;
        let (r, seen) = against(&spec_text(("", "")), tasks, PrivacyPolicy::default()).await;
        let e = refusal(r);
        assert!(e.contains(needle), "{what}: {e}");
        let left = seen.left.unwrap_or_default();
        assert!(left.contains(needle), "{what}: left with `{left}`");
        let expected: Vec<u32> = if changed_later { vec![1] } else { vec![] };
        assert_eq!(
            seen.updates, expected,
            "{what}: no update under those settings"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_aggregation_tasks_that_depart_from_the_spec_are_refused_before_any_key_leaves() {
    let secure = spec_text((
        "rounds = 2\nmin_sites = 1\n",
        "rounds = 2\nmin_sites = 3\n[federation.secure_aggregation]\n",
    ));
    let sa = |degree: u32, roster: &[&str]| fedee_proto::v1::SecAggTask {
        roster: roster.iter().map(|s| s.to_string()).collect(),
        degree,
        session: vec![1; 32],
    };
    let cases = [
        // The spec asks for no secure aggregation, the task runs it (or the reverse).
        (
            spec_text(("", "")),
            Task {
                secure_aggregation: Some(sa(0, &["A", "B", "North"])),
                ..task(1)
            },
            "does not ask for",
        ),
        (secure.clone(), task(1), "asks for"),
        // A degree other than the spec's.
        (
            secure.clone(),
            Task {
                secure_aggregation: Some(sa(2, &["A", "B", "North"])),
                ..task(1)
            },
            "degree 2 differs from the spec's 0",
        ),
        // A roster without this site.
        (
            secure.clone(),
            Task {
                secure_aggregation: Some(sa(0, &["A", "B", "C"])),
                ..task(1)
            },
            "leaves out this site `North`",
        ),
        // A roster too small to hide anyone.
        (
            secure.clone(),
            Task {
                secure_aggregation: Some(sa(0, &["A", "North"])),
                ..task(1)
            },
            "3 to 255",
        ),
    ];
    for (spec, t, needle) in cases {
        let (r, seen) = against(&spec, vec![t], PrivacyPolicy::default()).await;
        let e = match r {
            Err(e @ (SiteError::Refused(_) | SiteError::SecureAggregation(_))) => e.to_string(),
            other => panic!("{needle}: expected a refusal, got {other:?}"),
        };
        assert!(e.contains(needle), "{needle}: {e}");
        assert_eq!(seen.secagg, 0, "{needle}: no key may leave");
        let left = seen.left.unwrap_or_default();
        assert!(left.contains(needle), "{needle}: left with `{left}`");
        assert!(seen.updates.is_empty(), "{needle}: no update");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_outside_the_sites_policy_is_refused_before_joining() {
    let cases = [
        (
            ("noise_multiplier = 1.0", "noise_multiplier = 0.1"),
            PrivacyPolicy::default(),
            "--min-noise-multiplier",
        ),
        (
            ("delta = 1e-5", "delta = 1e-3"),
            PrivacyPolicy::default(),
            "--max-delta",
        ),
        (
            ("noise_multiplier = 1.0", "target_epsilon = 50.0"),
            PrivacyPolicy::default(),
            "--epsilon-budget",
        ),
        (
            ("clipping_norm = 1.0", "clipping_norm = 5.0"),
            PrivacyPolicy {
                max_clipping_norm: 2.0,
                ..PrivacyPolicy::default()
            },
            "--max-clipping-norm",
        ),
        (
            ("mode = \"site\"", "mode = \"record\""),
            PrivacyPolicy {
                modes: vec![fedee_dp::DpMode::Site],
                ..PrivacyPolicy::default()
            },
            "--dp-modes",
        ),
    ];
    for (edit, policy, needle) in cases {
        let (r, seen) = against(&spec_text(edit), vec![task(1)], policy).await;
        let e = refusal(r);
        assert!(e.contains(needle), "{edit:?}: {e}");
        assert!(!seen.joined, "{edit:?}: refused before joining");
        assert!(seen.updates.is_empty());
    }
    // The same weak spec, accepted only when the hospital says so explicitly.
    let (r, seen) = against(
        &spec_text(("noise_multiplier = 1.0", "noise_multiplier = 0.1")),
        vec![Task {
            noise_multiplier: 0.1,
            ..task(1)
        }],
        PrivacyPolicy {
            min_noise_multiplier: 0.1,
            epsilon_budget: f64::INFINITY,
            ..PrivacyPolicy::default()
        },
    )
    .await;
    assert_eq!(r.unwrap().rounds_trained, vec![1]);
    assert_eq!(seen.updates, vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_larger_than_the_spec_allows_is_refused_before_it_is_allocated() {
    let spec = spec_text(("", ""));
    let bound = fedee_site_agent::task::model_bytes_bound(
        &fedee_spec::SignedSpec::parse(&spec).unwrap().spec,
    )
    .unwrap();
    // One byte more than the bound: refused at the first chunk, which declares the size.
    let (r, seen) = against_with_model(
        &spec,
        vec![task(1)],
        PrivacyPolicy::default(),
        vec![0u8; (bound + 1) as usize],
    )
    .await;
    let e = r.unwrap_err().to_string();
    assert!(
        e.contains(&format!("exceeds the limit of {bound} bytes")),
        "{e}"
    );
    assert!(seen.updates.is_empty());
}
