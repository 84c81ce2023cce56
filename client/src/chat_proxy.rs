//! `fedee chat-proxy`: a local, OpenAI-compatible endpoint in front of an EE causal LM at a
//! trainer, or at two HSS-EE servers. Point an OpenAI client at it (`base_url =
//! http://127.0.0.1:PORT/v1`); it applies the model's chat template, tokenizes, encrypts the
//! ids with the key file, has the model generate ([`Backend`]), decrypts the ids and
//! detokenizes them incrementally.
//!
//! Routes (OpenAI's Chat Completions API, the subset a chat client uses):
//! * `GET /v1/models`: the one model served.
//! * `POST /v1/chat/completions`: `messages` (roles system, developer, user, assistant;
//!   content a string or text parts), `max_tokens` / `max_completion_tokens`, `temperature`
//!   (0–2, default 1), `top_p` (default 1), `seed`, `stop` (a string or up to 4), `n` = 1,
//!   `stream`, `stream_options.include_usage`. Non-streaming answers are a `chat.completion`;
//!   streaming answers are server-sent `chat.completion.chunk` events (the role first, then
//!   content deltas, then the finish reason, then usage when asked) and `data: [DONE]`.
//! * Errors are `{"error": {"message", "type", "param", "code"}}` with 400 (bad request), 404
//!   (unknown model or route) or 502 (the trainer or an HSS server failed).
//!
//! Detokenization holds back bytes of an unfinished UTF-8 character and any text that could
//! still become a stop string, so a client never sees half a character or part of a stop
//! string.
//!
//! # Security
//! The proxy holds the key file and sees prompts and answers in plaintext: it listens on
//! loopback unless told otherwise. The trainer receives encrypted ids, sampling settings and
//! the token counts; stop strings never leave the proxy (it cancels the generation itself).
//! With [`Backend::Hss`] the proxy runs the generation loop itself on the EE model (embedding,
//! RMSNorm, RoPE, attention, SiLU, sampling) and each HSS server sees only ring shares of the
//! activations entering every linear map (`fedee_hss`), never token ids; two colluding
//! servers see every activation.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use fedee_hss::client::HssClient;
use fedee_hss::service::Remote;
use fedee_model::StateDict;
use fedee_model::chat::{ChatMessage, LmTokenizer};
use fedee_model::llama::{Generation, LlamaConfig};
use fedee_model::sample::Sampling;
use fedee_proto::v1::{GenerateRequest, GeneratedToken};
use fedee_trainer::TrainerClient;
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::lm::LmKeys;

/// What the proxy serves.
pub struct Proxy {
    /// Keys and tokenizer.
    pub lm: LmKeys,
    /// Where the EE model runs.
    pub backend: Backend,
    /// The model id clients name (`GET /v1/models`).
    pub model: String,
}

/// Where the EE model runs.
pub enum Backend {
    /// A trainer holding the whole EE model (`fedee trainer`): it runs the generation loop on
    /// encrypted ids and streams encrypted ids back.
    Trainer {
        /// The trainer.
        client: TrainerClient,
        /// Its job holding the EE model.
        job: String,
    },
    /// HSS-EE: two non-colluding `fedee hss-server`s compute the EE model's linear maps on
    /// ring shares; the proxy runs the rest. One generation at a time (a second request waits).
    Hss(Arc<std::sync::Mutex<HssLm>>),
}

/// The key holder's half of HSS-EE for a causal LM: the connection to the two servers and the
/// EE model (of which only the embeddings and the RMSNorm weights are read here).
pub struct HssLm {
    /// The two servers, holding the quantized EE linear maps.
    pub client: HssClient<Remote>,
    /// The model's shapes.
    pub config: LlamaConfig,
    /// The EE model.
    pub ee: StateDict,
}

impl HssLm {
    /// Encrypt `state` with `lm`'s keys, upload its linear maps (every block's and the head)
    /// to the HSS servers at `urls` (`https://` with `tls`; each must quantize them as this
    /// side does) and keep the EE model here.
    ///
    /// # Errors
    /// Keys that do not fit `state`; a server that cannot be reached or refuses the model.
    pub async fn connect(
        urls: [&str; 2],
        tls: Option<&fedee_proto::pki::TlsFiles>,
        lm: &LmKeys,
        config: &LlamaConfig,
        state: &StateDict,
    ) -> crate::Result<Self> {
        use fedee_hss::client::{llama_linear_maps, offloaded, weight_frac_bits};
        let ee = lm.encrypt_model(state)?;
        let off = offloaded(&llama_linear_maps(config), &ee);
        let maps = fedee_hss::server::quantize_state(&off)?;
        let remote = Remote::connect(urls, tls, &off, &weight_frac_bits(&maps)).await?;
        Ok(Self {
            client: HssClient::with_maps(remote, maps),
            config: config.clone(),
            ee,
        })
    }
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    param: Option<&'static str>,
    code: Option<&'static str>,
}

impl ApiError {
    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
            param: Some(param),
            code: None,
        }
    }

    fn upstream(message: impl std::fmt::Display) -> Self {
        Self {
            status: StatusCode::BAD_GATEWAY,
            kind: "upstream_error",
            message: format!("the trainer failed: {message}"),
            param: None,
            code: None,
        }
    }

    fn hss(message: impl std::fmt::Display) -> Self {
        Self {
            message: format!("HSS-EE failed: {message}"),
            ..Self::upstream("")
        }
    }

    fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

/// Text content: a string, or a list of `{"type": "text", "text": ...}` parts.
#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The request fields the proxy reads; others (`user`, `logit_bias`, …) are ignored.
#[derive(Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    n: Option<u32>,
}

/// A checked request, ready for the trainer.
struct Prepared {
    request: GenerateRequest,
    prompt_tokens: usize,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

fn prepare(proxy: &Proxy, body: &[u8]) -> Result<Prepared, ApiError> {
    let req: ChatRequest = serde_json::from_slice(body)
        .map_err(|e| ApiError::invalid("body", format!("the request body is not valid: {e}")))?;
    if let Some(m) = req.model.as_deref().filter(|m| *m != proxy.model) {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            message: format!(
                "the model `{m}` does not exist here: this proxy serves `{}`",
                proxy.model
            ),
            param: Some("model"),
            code: Some("model_not_found"),
        });
    }
    if req.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid(
            "n",
            "only n = 1 is supported: send one request per completion",
        ));
    }
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.into_iter().enumerate() {
        let role = match m.role.as_str() {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "messages[{i}].role `{r}` is not supported: use system, developer, user or assistant"
                    ),
                ));
            }
        };
        let content = match m.content {
            None => String::new(),
            Some(Content::Text(t)) => t,
            Some(Content::Parts(parts)) => {
                let mut t = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(x)) => t.push_str(&x),
                        (k, _) => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "messages[{i}] has a `{k}` part: this model takes text parts only"
                                ),
                            ));
                        }
                    }
                }
                t
            }
        };
        messages.push(ChatMessage {
            role: role.into(),
            content,
        });
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature {temperature} must be between 0 and 2"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(0.0..=1.0).contains(&top_p) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p {top_p} must be between 0 and 1"),
        ));
    }
    let stops = match req.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    if stops.len() > 4 || stops.iter().any(String::is_empty) {
        return Err(ApiError::invalid(
            "stop",
            "stop takes up to 4 non-empty strings",
        ));
    }
    let text = proxy
        .lm
        .tokenizer
        .render_chat(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let ids = proxy
        .lm
        .tokenizer
        .encode(&text)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let context = proxy.lm.config.max_position;
    let room = context.saturating_sub(ids.len());
    if room == 0 {
        return Err(ApiError {
            code: Some("context_length_exceeded"),
            ..ApiError::invalid(
                "messages",
                format!(
                    "the prompt has {} tokens; the model's context is {context}",
                    ids.len()
                ),
            )
        });
    }
    let max_tokens = match req.max_completion_tokens.or(req.max_tokens) {
        Some(0) => {
            return Err(ApiError::invalid(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(m) if m as usize > room => {
            return Err(ApiError {
                code: Some("context_length_exceeded"),
                ..ApiError::invalid(
                    "max_tokens",
                    format!(
                        "the prompt has {} tokens and max_tokens is {m}, more than the model's context of {context}: ask for at most {room}",
                        ids.len()
                    ),
                )
            });
        }
        Some(m) => m as usize,
        None => room,
    };
    let seed = match req.seed {
        Some(s) => s as u64,
        None => rand::rng().random(),
    };
    Ok(Prepared {
        request: GenerateRequest {
            job_id: match &proxy.backend {
                Backend::Trainer { job, .. } => job.clone(),
                Backend::Hss(_) => String::new(),
            },
            prompt_ids: proxy.lm.encrypt_ids(&ids),
            max_tokens: max_tokens as u32,
            stop_ids: proxy.lm.stop_ids(),
            temperature,
            // The trainer reads 0 as "off"; OpenAI's top_p = 0 keeps the top token alone.
            top_p: top_p.max(1e-9),
            top_k: 0,
            seed,
        },
        prompt_tokens: ids.len(),
        stops,
        stream: req.stream,
        include_usage: req.stream_options.unwrap_or_default().include_usage,
    })
}

/// Incremental detokenization with stop strings (the prefix/read offsets of Hugging Face's
/// text-generation-inference and vLLM): each token's text is the decoded window minus the
/// decoded prefix, emitted only once it no longer ends in an unfinished UTF-8 character.
pub struct Detokenizer<'a> {
    tokenizer: &'a LmTokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    /// Text decoded so far.
    text: String,
    /// Bytes of `text` handed out.
    sent: usize,
    stops: Vec<String>,
}

impl<'a> Detokenizer<'a> {
    /// A detokenizer stopping at any of `stops`.
    pub fn new(tokenizer: &'a LmTokenizer, stops: Vec<String>) -> Self {
        Self {
            tokenizer,
            ids: vec![],
            prefix: 0,
            read: 0,
            text: String::new(),
            sent: 0,
            stops,
        }
    }

    /// Add the plaintext token `id`; returns the text that may be shown now, and whether a
    /// stop string ended the answer (the text then stops before it).
    ///
    /// # Errors
    /// [`crate::KeyHolderError::Model`] if the tokenizer fails.
    pub fn push(&mut self, id: u32) -> crate::Result<(String, bool)> {
        self.ids.push(id);
        let tok = self.tokenizer;
        let before = tok.decode(&self.ids[self.prefix..self.read], false)?;
        let now = tok.decode(&self.ids[self.prefix..], false)?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.starts_with(&before) {
            self.text.push_str(&now[before.len()..]);
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        // A stop string that ends in the new text started at most its length back.
        let longest = self.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(end) = hit {
            let out = self.text[self.sent..end.max(self.sent)].to_owned();
            self.sent = end.max(self.sent);
            return Ok((out, true));
        }
        // Hold back the longest tail that could still grow into a stop string.
        let hold = (1..=longest.min(self.text.len() - self.sent))
            .rev()
            .find(|&k| {
                let start = self.text.len() - k;
                self.text.is_char_boundary(start)
                    && self
                        .stops
                        .iter()
                        .any(|s| s.starts_with(&self.text[start..]))
            })
            .unwrap_or(0);
        let end = self.text.len() - hold;
        let out = self.text[self.sent..end].to_owned();
        self.sent = end;
        Ok((out, false))
    }

    /// The text held back, released when the answer ends without a stop string.
    pub fn finish(&mut self) -> String {
        let out = self.text[self.sent..].to_owned();
        self.sent = self.text.len();
        out
    }
}

/// What the generation task reports.
enum Out {
    Text(String),
    Done {
        finish_reason: &'static str,
        completion_tokens: usize,
    },
    Failed(ApiError),
}

type Tokens =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<GeneratedToken, ApiError>> + Send>>;

/// The encrypted ids of one generation, as the backend produces them; the last carries the
/// finish reason. Dropping the stream stops the generation.
async fn tokens(proxy: &Proxy, request: GenerateRequest) -> Result<Tokens, ApiError> {
    match &proxy.backend {
        Backend::Trainer { client, .. } => {
            let s = client
                .clone()
                .generate(request)
                .await
                .map_err(ApiError::upstream)?;
            Ok(Box::pin(s.map(|r| r.map_err(ApiError::upstream))))
        }
        Backend::Hss(hss) => Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(
            hss_generate(hss.clone(), request),
        ))),
    }
}

/// One generation through HSS-EE on a blocking thread, with the trainer's loop
/// ([`Generation`]: the same sampler, stop ids and length rule) and every linear map at the
/// two servers. Stops after the current step when the receiver is dropped.
fn hss_generate(
    hss: Arc<std::sync::Mutex<HssLm>>,
    r: GenerateRequest,
) -> mpsc::Receiver<Result<GeneratedToken, ApiError>> {
    let (tx, rx) = mpsc::channel(16);
    tokio::task::spawn_blocking(move || {
        let _guard = tch::no_grad_guard();
        // A panic in an earlier generation leaves nothing half-written that matters here.
        let mut lm = hss
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let HssLm { client, config, ee } = &mut *lm;
        let fail = |e: String| {
            let _ = tx.blocking_send(Err(ApiError::hss(e)));
        };
        let s = match config.check_state(ee) {
            Ok(s) => s,
            Err(e) => return fail(e.to_string()),
        };
        let embd = s.get("token_embd.weight");
        let sampling = Sampling {
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k as usize,
            seed: r.seed,
        };
        let (kind, device) = (embd.kind(), embd.device());
        let mut g = match Generation::new(
            config,
            r.prompt_ids,
            r.max_tokens as usize,
            r.stop_ids,
            sampling,
            (kind, device),
        ) {
            Ok(g) => g,
            Err(e) => return fail(e.to_string()),
        };
        loop {
            let (token, finish) = match g.step_with(config, s, |x, maps| client.linears(x, maps)) {
                Ok(t) => t,
                Err(e) => return fail(e.to_string()),
            };
            let msg = GeneratedToken {
                token_id: token,
                finish_reason: finish.map_or("", |f| f.as_str()).into(),
            };
            if tx.blocking_send(Ok(msg)).is_err() || finish.is_some() {
                return;
            }
        }
    });
    rx
}

/// Run one generation, sending text as it is decoded. Stops early (cancelling the backend's
/// work) when `tx` closes or a stop string appears.
async fn generate(proxy: Arc<Proxy>, p: Prepared, tx: mpsc::Sender<Out>) {
    let mut stream = match tokens(&proxy, p.request).await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Out::Failed(e)).await;
            return;
        }
    };
    let mut detok = Detokenizer::new(&proxy.lm.tokenizer, p.stops);
    let mut completion_tokens = 0;
    let done = |finish_reason, completion_tokens| Out::Done {
        finish_reason,
        completion_tokens,
    };
    loop {
        let msg = match stream.next().await {
            Some(Ok(m)) => m,
            None => {
                let _ = tx
                    .send(Out::Failed(ApiError::upstream(
                        "the token stream ended without a finish reason",
                    )))
                    .await;
                return;
            }
            Some(Err(e)) => {
                let _ = tx.send(Out::Failed(e)).await;
                return;
            }
        };
        completion_tokens += 1;
        let id = match proxy.lm.decrypt_id(msg.token_id) {
            Ok(id) => id,
            Err(e) => {
                let _ = tx.send(Out::Failed(ApiError::upstream(e))).await;
                return;
            }
        };
        let (text, stopped) = if proxy.lm.is_stop(id) {
            (String::new(), false)
        } else {
            match detok.push(id) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Out::Failed(ApiError::upstream(e))).await;
                    return;
                }
            }
        };
        if !text.is_empty() && tx.send(Out::Text(text)).await.is_err() {
            return;
        }
        if stopped {
            let _ = tx.send(done("stop", completion_tokens)).await;
            return;
        }
        let reason = match msg.finish_reason.as_str() {
            "" => continue,
            "stop" => "stop",
            _ => "length",
        };
        let rest = detok.finish();
        if !rest.is_empty() && tx.send(Out::Text(rest)).await.is_err() {
            return;
        }
        let _ = tx.send(done(reason, completion_tokens)).await;
        return;
    }
}

/// One streamed `chat.completion.chunk` with one choice.
pub fn chunk_json(
    id: &str,
    created: u64,
    model: &str,
    delta: Value,
    finish: Option<&str>,
) -> Value {
    json!({
        "id": id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

async fn chat_completions(State(proxy): State<Arc<Proxy>>, body: Bytes) -> Response {
    let started = Instant::now();
    let p = match prepare(&proxy, &body) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let id = format!("chatcmpl-{:024x}", rand::rng().random::<u128>() >> 32);
    let (created, model) = (now_unix(), proxy.model.clone());
    let (stream, include_usage, prompt_tokens) = (p.stream, p.include_usage, p.prompt_tokens);
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(generate(proxy, p, tx));
    if !stream {
        let mut content = String::new();
        while let Some(out) = rx.recv().await {
            match out {
                Out::Text(t) => content.push_str(&t),
                Out::Failed(e) => return e.into_response(),
                Out::Done {
                    finish_reason,
                    completion_tokens,
                } => {
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        completion_tokens,
                        "chat completion"
                    );
                    return axum::Json(json!({
                        "id": id,
                        "object": "chat.completion",
                        "created": created,
                        "model": model,
                        "choices": [{
                            "index": 0,
                            "message": {"role": "assistant", "content": content, "refusal": null},
                            "logprobs": null,
                            "finish_reason": finish_reason,
                        }],
                        "usage": usage(prompt_tokens, completion_tokens),
                    }))
                    .into_response();
                }
            }
        }
        return ApiError::upstream("the generation stopped without an answer").into_response();
    }
    let chunk = move |delta: Value, finish: Option<&str>| {
        let mut c = chunk_json(&id, created, &model, delta, finish);
        if include_usage {
            c["usage"] = Value::Null;
        }
        c
    };
    let (etx, erx) = mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let send = |v: Value| Event::default().data(v.to_string());
        let first = chunk(json!({"role": "assistant", "content": ""}), None);
        if etx.send(Ok(send(first))).await.is_err() {
            return;
        }
        while let Some(out) = rx.recv().await {
            let event = match out {
                Out::Text(t) => send(chunk(json!({ "content": t }), None)),
                Out::Failed(e) => {
                    let _ = etx.send(Ok(send(e.body()))).await;
                    return;
                }
                Out::Done {
                    finish_reason,
                    completion_tokens,
                } => {
                    let mut last = vec![send(chunk(json!({}), Some(finish_reason)))];
                    if include_usage {
                        let mut u = chunk(json!({}), None);
                        u["choices"] = json!([]);
                        u["usage"] = usage(prompt_tokens, completion_tokens);
                        last.push(send(u));
                    }
                    last.push(Event::default().data("[DONE]"));
                    for e in last {
                        if etx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                    return;
                }
            };
            if etx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(erx)).into_response()
}

async fn models(State(proxy): State<Arc<Proxy>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": proxy.model, "object": "model", "created": 0, "owned_by": "fedee"}],
    }))
    .into_response()
}

async fn not_found() -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: "unknown route: this proxy serves GET /v1/models and POST /v1/chat/completions"
            .into(),
        param: None,
        code: None,
    }
    .into_response()
}

/// The proxy's routes.
pub fn router(proxy: Arc<Proxy>) -> Router {
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .with_state(proxy)
}

/// Serve `proxy` on `listener` until `shutdown` completes.
///
/// # Errors
/// I/O errors of the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    proxy: Proxy,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(Arc::new(proxy)))
        .with_graceful_shutdown(shutdown)
        .await
}

/// Whether `addr` is a loopback address (the proxy's default; it serves plaintext).
pub fn is_loopback(addr: &SocketAddr) -> bool {
    addr.ip().is_loopback()
}
