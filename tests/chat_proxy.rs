//! The EE causal LM served end to end: a trainer (mutual TLS) holds SmolLM2's EE model
//! (inference profile keys), `fedee chat-proxy`'s library serves the OpenAI API in front of
//! it, and the official `openai` Python client talks to the proxy. Checked against the
//! plaintext model run here: the greedy answer, streaming and not, usage counts, the length
//! and stop finishes, seeded sampling, errors; and the trainer's recorded prompts hold no
//! plaintext token ids.

use std::path::{Path, PathBuf};
use std::process::Command;

use fedee_client::chat_proxy::{Backend, HssLm, Proxy, serve};
use fedee_client::lm::{LmKeys, upload};
use fedee_encrypt::KeySet;
use fedee_model::chat::ChatMessage;
use fedee_model::gguf::{self, RopeLayout};
use fedee_model::{Profile, llama};
use fedee_proto::pki::{CertRequest, Role, TlsFiles, init_ca, issue};
use fedee_proto::v1::GenerateRequest;
use fedee_trainer::TrainerClient;
use rand::SeedableRng;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const PROMPT: &str = "What is the capital of France?";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn python() -> PathBuf {
    let p = root().join(".venv/bin/python");
    assert!(p.exists(), "{} is missing: run `make test`", p.display());
    p
}

fn pki(dir: &Path) -> (TlsFiles, TlsFiles) {
    init_ca(dir, "test", 1, false).unwrap();
    issue(dir, &CertRequest::new(Role::Trainer, "trainer", 1), false).unwrap();
    issue(dir, &CertRequest::new(Role::Client, "pharma", 1), false).unwrap();
    (
        TlsFiles::in_dir(dir, "trainer"),
        TlsFiles::in_dir(dir, "pharma"),
    )
}

/// The plaintext reference for [`PROMPT`]: SmolLM2, the key holder's keys (inference profile,
/// drawn from `seed`), the chat prompt's ids, and the plaintext model's greedy answer of up to
/// `max_new` tokens (ended by `<|im_end|>`): its ids, and its text without the stop id.
struct Reference {
    m: gguf::GgufModel,
    lm: LmKeys,
    prompt_ids: Vec<u32>,
    ids: Vec<i64>,
    greedy: Vec<i64>,
    answer_ids: Vec<u32>,
    answer: String,
}

fn reference(seed: u64, max_new: usize) -> Reference {
    let path = root().join("data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        path.exists(),
        "{} is missing: run `make data`",
        path.display()
    );
    let m = gguf::load(&path, RopeLayout::HalfSplit).unwrap();
    let keys = KeySet::generate(
        &m.config.key_spec(),
        &m.config.key_groups(Profile::Inference),
        false,
        &mut rand_chacha::ChaCha20Rng::seed_from_u64(seed),
    )
    .unwrap();
    let lm = LmKeys::new(&m, keys).unwrap();
    let chat = lm
        .tokenizer
        .render_chat(
            &[ChatMessage {
                role: "user".into(),
                content: PROMPT.into(),
            }],
            true,
        )
        .unwrap();
    let prompt_ids = lm.tokenizer.encode(&chat).unwrap();
    let ids: Vec<i64> = prompt_ids.iter().map(|&i| i64::from(i)).collect();
    let im_end = lm.tokenizer.token_id("<|im_end|>").unwrap();
    let (greedy, _) = tch::no_grad(|| {
        llama::greedy(
            &m.config,
            m.config.check_state(&m.state).unwrap(),
            &ids,
            max_new,
            Some(i64::from(im_end)),
        )
    })
    .unwrap();
    let answer_ids: Vec<u32> = greedy
        .iter()
        .map(|&i| i as u32)
        .filter(|&i| !lm.is_stop(i))
        .collect();
    let answer = lm.tokenizer.decode(&answer_ids, false).unwrap();
    assert!(answer.contains("Paris"), "plaintext answer: {answer:?}");
    Reference {
        m,
        lm,
        prompt_ids,
        ids,
        greedy,
        answer_ids,
        answer,
    }
}

/// `scripts/openai_chat_check.py` (the official `openai` client) against the proxy at
/// `base_url` with [`PROMPT`]: what it printed.
async fn openai_check(base_url: String, model: &str, extra: &[&str]) -> Value {
    let mut cmd = Command::new(python());
    cmd.arg(root().join("scripts/openai_chat_check.py"))
        .args([base_url.as_str(), model, PROMPT])
        .args(extra);
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "openai client failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("{}", serde_json::to_string_pretty(&r).unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_chats_with_the_ee_model_through_the_proxy() {
    tch::set_num_threads(2);
    let Reference {
        m,
        lm,
        prompt_ids,
        ids,
        greedy,
        answer_ids,
        answer,
    } = reference(5, 40);
    let three = lm.tokenizer.decode(&answer_ids[..3], false).unwrap();

    // A trainer with mutual TLS that records the prompts it receives.
    let dir = tempfile::tempdir().unwrap();
    let (server_tls, client_tls) = pki(dir.path());
    let (log_tx, mut log_rx) = tokio::sync::mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    let trainer = tokio::spawn(fedee_trainer::run(
        fedee_trainer::Config {
            tls: Some(server_tls),
            prompt_log: Some(log_tx),
            ..Default::default()
        },
        listener,
        stop.clone(),
    ));
    let mut client = TrainerClient::connect(&format!("https://{addr}"), Some(&client_tls))
        .await
        .unwrap();
    let job = upload(&mut client, &m.state, &lm, None, "f32")
        .await
        .unwrap();
    let (grpc, job_id) = (client.clone(), job.clone());
    drop(m);

    // The proxy.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let model = "smollm2-ee".to_owned();
    let proxy_stop = stop.clone();
    let encrypted_prompt = lm.encrypt_ids(&prompt_ids);
    let proxy = tokio::spawn(serve(
        listener,
        Proxy {
            lm,
            backend: Backend::Trainer { client, job },
            model: model.clone(),
        },
        async move { proxy_stop.cancelled().await },
    ));

    let r = openai_check(format!("http://{proxy_addr}/v1"), &model, &[]).await;

    assert_eq!(r["models"], serde_json::json!(["smollm2-ee"]));
    // Non-streaming: the plaintext model's greedy answer, ended by <|im_end|>.
    let plain = &r["plain"];
    assert_eq!(plain["object"], "chat.completion");
    assert_eq!(plain["role"], "assistant");
    assert_eq!(plain["content"], answer.as_str());
    assert_eq!(plain["finish_reason"], "stop");
    assert_eq!(plain["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(plain["usage"]["completion_tokens"], greedy.len());
    assert_eq!(
        plain["usage"]["total_tokens"],
        prompt_ids.len() + greedy.len()
    );
    // Streaming: the role first, the same text in several pieces, one finish, usage last.
    let s = &r["stream"];
    assert_eq!(s["objects"], serde_json::json!(["chat.completion.chunk"]));
    assert_eq!(s["first_role"], "assistant");
    assert_eq!(s["content"], answer.as_str());
    assert!(s["pieces"].as_array().unwrap().len() > 3, "{s}");
    assert_eq!(s["finish_reasons"], serde_json::json!(["stop"]));
    assert_eq!(s["usage"][0]["completion_tokens"], greedy.len());
    assert_eq!(r["stream_no_usage"]["usage"], serde_json::json!([]));
    assert_eq!(r["stream_no_usage"]["content"], answer.as_str());
    // max_tokens: three tokens, finish "length".
    assert_eq!(r["length"]["finish_reason"], "length");
    assert_eq!(r["length"]["usage"]["completion_tokens"], 3);
    assert_eq!(r["length"]["content"], three.as_str());
    // Stop strings: the text before the first occurrence, never a part of it.
    let before = |stop: &str| answer[..answer.find(stop).unwrap()].to_owned();
    assert_eq!(r["stop"]["content"], before("Paris").as_str());
    assert_eq!(r["stop"]["finish_reason"], "stop");
    assert_eq!(r["stream_stop"]["content"], before(" of").as_str());
    assert_eq!(
        r["stream_stop"]["finish_reasons"],
        serde_json::json!(["stop"])
    );
    // Seeded sampling is reproducible, and another seed samples something else.
    let sampled = r["sampled"].as_array().unwrap();
    assert_eq!(sampled[0], sampled[1]);
    assert!(!sampled[0].as_str().unwrap().is_empty());
    assert_ne!(sampled[0], r["sampled_other_seed"]);
    // Invalid requests: 4xx with an OpenAI error body naming the problem.
    let e = &r["errors"];
    for (name, status, word) in [
        ("temperature", 400, "temperature"),
        ("n", 400, "n = 1"),
        ("max_tokens", 400, "max_tokens"),
        ("model", 404, "gpt-4o"),
        ("role", 400, "tool"),
    ] {
        assert_eq!(e[name]["status"], status, "{name}: {}", e[name]);
        assert!(
            e[name]["body"].to_string().contains(word),
            "{name}: {}",
            e[name]
        );
    }

    // Hostile or malformed Generate calls straight to the trainer: refused, naming the value.
    let request = |edit: &dyn Fn(&mut GenerateRequest)| {
        let mut r = GenerateRequest {
            job_id: job_id.clone(),
            prompt_ids: encrypted_prompt.clone(),
            max_tokens: 4,
            ..Default::default()
        };
        edit(&mut r);
        r
    };
    let mut g = grpc.clone();
    type Edit = fn(&mut GenerateRequest);
    let cases: [(Edit, &str); 8] = [
        (
            |r| r.prompt_ids[3] = 49_152,
            "prompt id 49152 is outside the vocabulary",
        ),
        (|r| r.stop_ids = vec![-1], "stop id -1"),
        (|r| r.prompt_ids.clear(), "the prompt has 0 tokens"),
        (
            |r| r.prompt_ids = vec![1; 8192],
            "the prompt has 8192 tokens",
        ),
        (|r| r.max_tokens = 0, "max_tokens must be at least 1"),
        (|r| r.temperature = f64::NAN, "temperature NaN"),
        (|r| r.top_p = 1.5, "top_p 1.5"),
        (|r| r.job_id = "job-nope".into(), "no job `job-nope`"),
    ];
    for (edit, want) in cases {
        let e = g.generate(request(&edit)).await.unwrap_err().to_string();
        assert!(e.contains(want), "{want}: {e}");
    }
    // Generate on a classifier job is refused.
    let mlp = fedee_model::MlpConfig {
        in_features: 2,
        hidden: vec![3],
        out_features: 2,
        activation: fedee_model::Activation::Relu,
    };
    let mlp_state = fedee_model::Mlp::new(mlp.clone(), tch::Device::Cpu, tch::Kind::Float)
        .unwrap()
        .state();
    let mlp_job = g
        .create_job(
            &fedee_model::Architecture::Mlp(mlp),
            &fedee_model::OptimizerSpec::Sgd {
                lr: 0.1,
                momentum: 0.0,
                weight_decay: 0.0,
            },
            "f32",
            &fedee_model::state_to_safetensors(&mlp_state).unwrap(),
        )
        .await
        .unwrap();
    let e = g
        .generate(request(&|r| r.job_id = mlp_job.clone()))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("is not a causal LM"), "{e}");

    // What the trainer received: every prompt encrypted, none in plaintext.
    stop.cancel();
    let _ = trainer.await;
    let _ = proxy.await;
    let mut prompts = vec![];
    while let Ok(p) = log_rx.try_recv() {
        prompts.push(p);
    }
    // 6 completions and 3 streams reached the trainer (the invalid requests did not).
    assert_eq!(prompts.len(), 9, "{} prompts recorded", prompts.len());
    for p in &prompts {
        assert_eq!(p, &encrypted_prompt);
        let same = p.iter().zip(&ids).filter(|(a, b)| a == b).count();
        assert!(
            same <= 2,
            "{same} of {} prompt ids arrived in plaintext",
            ids.len()
        );
        assert!(
            !p.windows(4).any(|w| ids.windows(4).any(|x| x == w)),
            "a run of 4 plaintext prompt ids reached the trainer"
        );
    }
}

/// HSS-EE behind the proxy: two HSS servers (mutual TLS) hold the EE model's linear maps, the
/// proxy runs the rest of each step and the sampling; the `openai` client gets the plaintext
/// model's greedy tokens, streaming and not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_client_chats_through_two_hss_servers() {
    const TOKENS: usize = 10;
    tch::set_num_threads(2);
    let Reference {
        m,
        lm,
        prompt_ids,
        greedy,
        answer,
        ..
    } = reference(6, TOKENS);
    let im_end = i64::from(lm.tokenizer.token_id("<|im_end|>").unwrap());
    let finish = if greedy.last() == Some(&im_end) {
        "stop"
    } else {
        "length"
    };

    let dir = tempfile::tempdir().unwrap();
    init_ca(dir.path(), "test", 1, false).unwrap();
    for name in ["hss0", "hss1"] {
        issue(dir.path(), &CertRequest::new(Role::Hss, name, 1), false).unwrap();
    }
    issue(
        dir.path(),
        &CertRequest::new(Role::Client, "pharma", 1),
        false,
    )
    .unwrap();
    let stop = CancellationToken::new();
    let mut urls = vec![];
    let mut servers = vec![];
    for name in ["hss0", "hss1"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        urls.push(format!("https://{}", listener.local_addr().unwrap()));
        servers.push(tokio::spawn(fedee_hss::service::run(
            fedee_hss::service::Config {
                tls: Some(TlsFiles::in_dir(dir.path(), name)),
                ..Default::default()
            },
            listener,
            stop.clone(),
        )));
    }
    let hss = HssLm::connect(
        [&urls[0], &urls[1]],
        Some(&TlsFiles::in_dir(dir.path(), "pharma")),
        &lm,
        &m.config,
        &m.state,
    )
    .await
    .unwrap();
    drop(m);

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let proxy_stop = stop.clone();
    let proxy = tokio::spawn(serve(
        listener,
        Proxy {
            lm,
            backend: Backend::Hss(std::sync::Arc::new(std::sync::Mutex::new(hss))),
            model: "smollm2-hss".into(),
        },
        async move { proxy_stop.cancelled().await },
    ));
    let short = TOKENS.to_string();
    let r = openai_check(
        format!("http://{proxy_addr}/v1"),
        "smollm2-hss",
        &["--short", &short],
    )
    .await;
    for (what, reply) in [("plain", &r["plain"]), ("stream", &r["stream"])] {
        assert_eq!(reply["content"], answer.as_str(), "{what}");
    }
    assert_eq!(r["plain"]["finish_reason"], finish);
    assert_eq!(r["plain"]["usage"]["completion_tokens"], greedy.len());
    assert_eq!(r["plain"]["usage"]["prompt_tokens"], prompt_ids.len());
    assert_eq!(r["stream"]["finish_reasons"], serde_json::json!([finish]));
    assert_eq!(r["stream"]["usage"][0]["completion_tokens"], greedy.len());
    stop.cancel();
    let _ = proxy.await;
    for s in servers {
        s.await.unwrap().unwrap();
    }
}

#[test]
fn detokenizing_never_shows_half_a_character_or_part_of_a_stop_string() {
    use fedee_client::chat_proxy::Detokenizer;
    let path = root().join("data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let m = gguf::load(&path, RopeLayout::HalfSplit).unwrap();
    let tok = fedee_model::chat::LmTokenizer::from_gguf(&m).unwrap();
    let text = "Café 🙂 naïve 日本語 done. STOP here";
    let ids = tok.encode(text).unwrap();
    // Multi-byte characters span several byte-level tokens: the test needs such a split.
    assert!(
        ids.iter()
            .any(|&i| tok.decode(&[i], false).unwrap().contains('\u{FFFD}')),
        "no token of {text:?} is a partial character"
    );
    for (stops, want, stopped) in [
        (vec![], text, false),
        (vec!["STOP".to_owned()], "Café 🙂 naïve 日本語 done. ", true),
        (vec!["本語 d".to_owned(), "é 🙂".to_owned()], "Caf", true),
        // A stop string that never completes is released at the end.
        (vec!["here!".to_owned()], text, false),
    ] {
        let mut d = Detokenizer::new(&tok, stops.clone());
        let (mut shown, mut hit) = (String::new(), false);
        for &i in &ids {
            let (piece, stop) = d.push(i).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "{stops:?}: half a character in {piece:?}"
            );
            shown.push_str(&piece);
            // Shown text is final, so it must always be a prefix of the answer.
            assert!(want.starts_with(&shown), "{stops:?}: showed {shown:?}");
            if stop {
                hit = true;
                break;
            }
        }
        if !hit {
            shown.push_str(&d.finish());
        }
        assert_eq!((shown.as_str(), hit), (want, stopped), "{stops:?}");
    }
}
