//! The federation service over real gRPC on loopback: FedAvg rounds, and every kind of bad
//! update rejected with a clear status while accepted updates are kept.

use fedee_aggregator::blobs::DirectIo;
use fedee_aggregator::tensors::Tensors;
use fedee_aggregator::{Config, run};
use fedee_dp::{ClippingNorm, NoiseMultiplier};
use fedee_proto::v1::federation_client::FederationClient;
use fedee_proto::v1::{
    DownloadModelRequest, JoinRequest, NextTaskRequest, StatusRequest, SubmitUpdateMessage,
    TaskKind, UpdateHeader, submit_update_message,
};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tonic::Code;
use tonic::transport::Channel;

fn model(v: f32) -> Tensors {
    Tensors {
        names: vec!["a".into(), "b".into()],
        shapes: vec![vec![2, 2], vec![3]],
        data: vec![vec![v; 4], vec![v; 3]],
    }
}

async fn start(
    rounds: u32,
    min_sites: u32,
) -> (
    FederationClient<Channel>,
    CancellationToken,
    tempfile::TempDir,
) {
    start_with(rounds, min_sites, model(1.0), |c| {
        c.direct_io = DirectIo::Auto
    })
    .await
}

async fn start_with(
    rounds: u32,
    min_sites: u32,
    initial: Tensors,
    edit: impl FnOnce(&mut Config),
) -> (
    FederationClient<Channel>,
    CancellationToken,
    tempfile::TempDir,
) {
    let blobs = tempfile::tempdir().unwrap();
    let mut config = Config {
        database_url: "sqlite::memory:".into(),
        blob_dir: blobs.path().to_owned(),
        round_timeout: std::time::Duration::from_secs(600),
        metrics_listen: None,
        rounds,
        min_sites,
        clipping_norm: ClippingNorm::new(1.0).unwrap(),
        noise_multiplier: NoiseMultiplier::new(1.0).unwrap(),
        dp_mode: fedee_dp::DpMode::Site,
        strategy: fedee_aggregator::strategy::Strategy::FedAvg,
        proximal_mu: 0.0,
        delta: 1e-5,
        local_epochs: 1,
        learning_rate: 0.1,
        batch_size: 8,
        initial_model: Some(initial.to_safetensors()),
        tls: None,
        enroll: vec![],
        max_concurrent_uploads: 4,
        direct_io: DirectIo::Auto,
        spec: None,
        // These tests are about rounds and aggregation, not privacy.
        max_epsilon: f64::INFINITY,
        max_num_examples: 1_000,
        secure_aggregation: None,
        dashboard: None,
    };
    edit(&mut config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let token = CancellationToken::new();
    tokio::spawn(run(config, listener, token.clone()));
    for _ in 0..100 {
        if let Ok(c) = FederationClient::connect(url.clone()).await {
            return (c, token, blobs);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("aggregator did not start");
}

fn msgs(
    site: &str,
    round: u32,
    n: u64,
    blob: &[u8],
    sha: Option<String>,
) -> Vec<SubmitUpdateMessage> {
    let header = UpdateHeader {
        site: site.into(),
        round,
        num_examples: n,
        sha256: sha.unwrap_or_else(|| hex::encode(Sha256::digest(blob))),
        privacy: None,
    };
    fedee_proto::update_messages(header, blob)
}

async fn join(c: &mut FederationClient<Channel>, sites: &[&str]) {
    for s in sites {
        c.join(JoinRequest {
            site: (*s).into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

async fn submit(
    c: &mut FederationClient<Channel>,
    m: Vec<SubmitUpdateMessage>,
) -> Result<u32, tonic::Status> {
    c.submit_update(futures::stream::iter(m))
        .await
        .map(|r| r.into_inner().updates_in_round)
}

async fn download(c: &mut FederationClient<Channel>, model: u32) -> Tensors {
    let mut s = c
        .download_model(DownloadModelRequest { model })
        .await
        .unwrap()
        .into_inner();
    let mut r = fedee_proto::Reassembler::new(1 << 30);
    while let Some(ch) = s.message().await.unwrap() {
        r.push(ch).unwrap();
    }
    Tensors::from_safetensors(&r.finish().unwrap()).unwrap()
}

#[tokio::test]
async fn fedavg_rounds_weighted_by_num_examples() {
    let (mut c, token, _blobs) = start(2, 2).await;
    join(&mut c, &["A", "B"]).await;
    let t = c
        .next_task(NextTaskRequest { site: "A".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.kind, t.round), (TaskKind::Train as i32, 1));
    assert_eq!(
        submit(
            &mut c,
            msgs("A", 1, 100, &model(4.0).to_safetensors(), None)
        )
        .await
        .unwrap(),
        1
    );
    let t = c
        .next_task(NextTaskRequest { site: "A".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(t.kind, TaskKind::Wait as i32, "A already submitted round 1");
    submit(
        &mut c,
        msgs("B", 1, 300, &model(0.0).to_safetensors(), None),
    )
    .await
    .unwrap();
    // 1 + 0.25·4 + 0.75·0 = 2
    let m2 = download(&mut c, 2).await;
    assert_eq!(m2.data[0], vec![2.0; 4]);
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.current_round, 2);
    assert_eq!(st.privacy_unit, "site update");
    assert!(
        (st.rounds[0].rho - 0.5).abs() < 1e-12,
        "ρ = 1/(2σ²) with σ = 1"
    );
    for s in ["A", "B"] {
        submit(&mut c, msgs(s, 2, 10, &model(1.0).to_safetensors(), None))
            .await
            .unwrap();
    }
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done);
    assert!(
        (st.rounds[1].rho - 1.0).abs() < 1e-12,
        "ρ composes additively"
    );
    let t = c
        .next_task(NextTaskRequest { site: "A".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((t.kind, t.round), (TaskKind::Done as i32, 3));
    token.cancel();
}

#[tokio::test]
async fn bad_updates_are_rejected_and_accepted_ones_kept() {
    let (mut c, token, _blobs) = start(1, 3).await;
    join(&mut c, &["A", "B", "C"]).await;
    let good = model(0.5).to_safetensors();
    assert_eq!(
        submit(&mut c, msgs("A", 1, 10, &good, None)).await.unwrap(),
        1
    );

    let cases: Vec<(&str, Vec<SubmitUpdateMessage>, Code, &str)> = vec![
        (
            "different second update",
            msgs("A", 1, 10, &model(0.25).to_safetensors(), None),
            Code::AlreadyExists,
            "already submitted a different update",
        ),
        (
            "stale round",
            msgs("B", 0, 10, &good, None),
            Code::FailedPrecondition,
            "stale round",
        ),
        (
            "future round",
            msgs("B", 7, 10, &good, None),
            Code::FailedPrecondition,
            "stale round",
        ),
        (
            "unknown site",
            msgs("Z", 1, 10, &good, None),
            Code::NotFound,
            "has not joined",
        ),
        (
            "wrong names",
            msgs(
                "B",
                1,
                10,
                &Tensors {
                    names: vec!["a".into(), "x".into()],
                    ..model(0.5)
                }
                .to_safetensors(),
                None,
            ),
            Code::InvalidArgument,
            "`b` is missing",
        ),
        (
            "wrong shape",
            msgs(
                "B",
                1,
                10,
                &Tensors {
                    shapes: vec![vec![4], vec![3]],
                    ..model(0.5)
                }
                .to_safetensors(),
                None,
            ),
            Code::InvalidArgument,
            "has shape [4]",
        ),
        (
            "NaN",
            msgs(
                "B",
                1,
                10,
                &Tensors {
                    data: vec![vec![f32::NAN; 4], vec![0.0; 3]],
                    ..model(0.5)
                }
                .to_safetensors(),
                None,
            ),
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "Inf",
            msgs(
                "B",
                1,
                10,
                &Tensors {
                    data: vec![vec![0.0; 4], vec![f32::INFINITY; 3]],
                    ..model(0.5)
                }
                .to_safetensors(),
                None,
            ),
            Code::InvalidArgument,
            "non-finite",
        ),
        (
            "wrong sha",
            msgs("B", 1, 10, &good, Some("00".repeat(32))),
            Code::InvalidArgument,
            "SHA-256 mismatch",
        ),
        (
            "garbage",
            msgs("B", 1, 10, b"not safetensors at all", None),
            Code::InvalidArgument,
            "not valid safetensors",
        ),
        (
            "zero examples",
            msgs("B", 1, 0, &good, None),
            Code::InvalidArgument,
            "num_examples 0 is outside 1..=1000",
        ),
        (
            // A weight past the federation's bound (and u64::MAX would wrap the sum).
            "too many examples",
            msgs("B", 1, u64::MAX, &good, None),
            Code::InvalidArgument,
            "federation.max_num_examples",
        ),
        (
            // ‖Δ‖ = 10·√7 ≈ 26.5 > C·(1 + σ·(√7 + 10)) ≈ 13.6 with C = σ = 1: not clipped.
            "unclipped",
            msgs("B", 1, 10, &model(10.0).to_safetensors(), None),
            Code::InvalidArgument,
            "L2 norm",
        ),
        (
            "truncated",
            {
                let mut m = msgs("B", 1, 10, &good, None);
                if let Some(submit_update_message::Msg::Chunk(ch)) = &mut m[1].msg {
                    ch.data.truncate(ch.data.len() / 2);
                }
                m
            },
            Code::InvalidArgument,
            "truncated",
        ),
        (
            "no header",
            msgs("B", 1, 10, &good, None)[1..].to_vec(),
            Code::InvalidArgument,
            "UpdateHeader",
        ),
    ];
    // The same update again (a retry after a lost acknowledgement) is acknowledged, not
    // counted twice.
    assert_eq!(
        submit(&mut c, msgs("A", 1, 10, &good, None)).await.unwrap(),
        1
    );
    for (what, m, code, text) in cases {
        let err = submit(&mut c, m).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {err:?}");
        assert!(
            err.message().contains(text),
            "{what}: message `{}` lacks `{text}`",
            err.message()
        );
    }
    // Nothing already accepted was lost; the round still takes the other sites.
    assert_eq!(
        submit(&mut c, msgs("B", 1, 10, &good, None)).await.unwrap(),
        2
    );
    assert_eq!(
        submit(&mut c, msgs("C", 1, 10, &good, None)).await.unwrap(),
        3
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done && st.rounds[0].state == "closed");
    let m2 = download(&mut c, 2).await;
    assert_eq!(m2.data[1], vec![1.5; 3]);
    token.cancel();
}

/// While a round is aggregated the state lock is released: status and task requests are
/// answered meanwhile (the round shows as "closing" and sites are told to wait), and the
/// update that completed the round is acknowledged once it has closed.
#[tokio::test]
async fn requests_are_answered_while_a_round_is_aggregated() {
    // 16 Mi parameters (64 MiB per update), coordinate-wise median: the close reads, hashes
    // and takes the median of 128 MiB and writes 64 MiB, long enough to be seen from another
    // connection (a FedAvg close only finishes the running sum). The updates are written with
    // direct I/O (every round, not only large ones), so the close reads files that bypassed
    // the page cache and the result below checks that path end to end.
    let n = 16 << 20;
    let big = move |v: f32| Tensors {
        names: vec!["w".into()],
        shapes: vec![vec![n]],
        data: vec![vec![v; n]],
    };
    let (mut c, token, _blobs) = start_with(1, 2, big(1.0), |c| {
        c.direct_io = DirectIo::Above(0);
        c.strategy = fedee_aggregator::strategy::Strategy::Median;
        // Updates of 2 and 4 per coordinate: far over a clipping norm of 1.
        c.clipping_norm = ClippingNorm::new(1e6).unwrap();
    })
    .await;
    join(&mut c, &["A", "B"]).await;
    submit(&mut c, msgs("A", 1, 10, &big(2.0).to_safetensors(), None))
        .await
        .unwrap();
    let mut last = c.clone();
    let closing = tokio::spawn(async move {
        submit(
            &mut last,
            msgs("B", 1, 30, &big(4.0).to_safetensors(), None),
        )
        .await
    });
    let mut seen_closing = 0;
    loop {
        // The task first: if the status after it still shows the round closing, the task
        // was answered before the close ended, and must be a wait.
        let t = c
            .next_task(NextTaskRequest { site: "A".into() })
            .await
            .unwrap()
            .into_inner();
        let st = c.status(StatusRequest {}).await.unwrap().into_inner();
        if st.rounds[0].state == "closing" {
            seen_closing += 1;
            assert_eq!(st.current_round, 1);
            assert_eq!((t.kind, t.round), (TaskKind::Wait as i32, 1));
        } else if st.rounds[0].state == "closed" {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(
        closing.await.unwrap().unwrap(),
        2,
        "B's update completed round 1"
    );
    assert!(
        seen_closing > 0,
        "no status answer came while round 1 was being aggregated"
    );
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(st.done && st.rounds[0].state == "closed");
    // Updates are deltas: 1 + median(2, 4) = 4 (FedAvg would give 1 + 0.25 · 2 + 0.75 · 4).
    assert!(download(&mut c, 2).await.data[0].iter().all(|&x| x == 4.0));
    token.cancel();
}

/// Finite updates whose weighted mean overflows f32 give a non-finite global model: the round
/// fails with that reason (not retried forever), the previous global model is kept and the
/// next round opens from it.
#[tokio::test]
async fn a_non_finite_global_model_fails_the_round_and_keeps_the_previous_one() {
    let big = 3e38f32;
    let (mut c, token, _blobs) = start_with(2, 2, model(big), |c| {
        c.clipping_norm = ClippingNorm::new(1e39).unwrap();
    })
    .await;
    join(&mut c, &["A", "B"]).await;
    // 3e38 + 3e38 overflows f32::MAX ≈ 3.4e38.
    for s in ["A", "B"] {
        submit(&mut c, msgs(s, 1, 10, &model(big).to_safetensors(), None))
            .await
            .unwrap();
    }
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.rounds[0].state, "failed", "{:?}", st.rounds[0]);
    assert!(
        st.rounds[0].reason.contains("not finite") && st.rounds[0].reason.contains("`a`"),
        "{}",
        st.rounds[0].reason
    );
    assert_eq!(st.current_round, 2);
    assert_eq!(
        download(&mut c, 2).await,
        model(big),
        "the previous global model is kept"
    );
    // The federation goes on: round 2 closes from the kept model.
    for s in ["A", "B"] {
        submit(&mut c, msgs(s, 2, 10, &model(-1e38).to_safetensors(), None))
            .await
            .unwrap();
    }
    let st = c.status(StatusRequest {}).await.unwrap().into_inner();
    assert!(
        st.done && st.rounds[1].state == "closed",
        "{:?}",
        st.rounds[1]
    );
    let next = (f64::from(big) + f64::from(-1e38f32)) as f32;
    assert_eq!(download(&mut c, 3).await, model(next));
    token.cancel();
}

/// Every strategy through the service over two rounds equals the pure strategy on the same
/// updates: FedAvg, FedAdam and FedYogi from the running sum (within an ulp of the in-memory
/// `Σ (nᵢ/N)Δᵢ`; FedOpt's moments persisted between the rounds), median and trimmed mean
/// from the files, bit for bit.
#[tokio::test]
async fn every_strategy_through_the_service_matches_the_pure_strategy() {
    use fedee_aggregator::strategy::{FedOpt, Strategy, aggregate};
    let o = FedOpt {
        lr: 0.1,
        ..FedOpt::default()
    };
    let update = |site: usize, round: u32| Tensors {
        names: vec!["a".into(), "b".into()],
        shapes: vec![vec![2, 2], vec![3]],
        data: vec![
            (0..4)
                .map(|j| ((site * 7 + j) as f32 * 0.31 + round as f32).sin() * 0.1)
                .collect(),
            (0..3)
                .map(|j| ((site * 5 + j) as f32 * 0.17 - round as f32).cos() * 0.1)
                .collect(),
        ],
    };
    let sites = ["A", "B", "C"];
    let weights = [30u64, 100, 7];
    for strategy in [
        Strategy::FedAvg,
        Strategy::FedAdam(o),
        Strategy::FedYogi(o),
        Strategy::Median,
        Strategy::TrimmedMean(0.2),
    ] {
        let (mut c, token, _blobs) = start_with(2, 3, model(1.0), |c| c.strategy = strategy).await;
        join(&mut c, &sites).await;
        let (mut want, mut state) = (model(1.0), None);
        for round in 1..=2 {
            let ups: Vec<Tensors> = (0..3).map(|s| update(s, round)).collect();
            // Accepted in reverse name order: the running sum folds in acceptance order.
            for s in (0..3).rev() {
                submit(
                    &mut c,
                    msgs(sites[s], round, weights[s], &ups[s].to_safetensors(), None),
                )
                .await
                .unwrap();
            }
            let pairs: Vec<(u64, &Tensors)> = weights.iter().copied().zip(&ups).collect();
            (want, state) = aggregate(strategy, &want, &pairs, state);
            let got = download(&mut c, round + 1).await;
            for (g, w) in got.data.iter().flatten().zip(want.data.iter().flatten()) {
                if strategy.is_mean_based() {
                    assert!(
                        (g - w).abs() <= f32::EPSILON * w.abs(),
                        "{strategy:?} round {round}: {g} vs {w}"
                    );
                } else {
                    assert_eq!(g.to_bits(), w.to_bits(), "{strategy:?} round {round}");
                }
            }
            // The service's result is the reference for the next round (an ulp apart at most).
            want = got;
        }
        token.cancel();
    }
}
