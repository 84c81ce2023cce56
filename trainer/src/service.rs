//! The `fedee.v1.Trainer` gRPC service: jobs held in memory.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};

use fedee_model::llama::{Finish, Generation};
use fedee_model::sample::Sampling;
use fedee_model::{
    Architecture, Input, Model, OptimizerSpec, batch_from_safetensors, state_from_safetensors,
    state_to_safetensors,
};
use fedee_proto::v1::trainer_server::{Trainer, TrainerServer};
use fedee_proto::v1::{
    Chunk, CreateJobMessage, CreateJobResponse, ExportModelRequest, GenerateRequest,
    GeneratedToken, JobSpec, PredictRequest, PredictResponse, StepResult, TrainBatch,
    create_job_message,
};
use fedee_proto::{Reassembler, chunks};
use futures::Stream;
use rand::Rng;
use sha2::{Digest, Sha256};
use tch::{Kind, nn};
use tokio::sync::{Mutex, mpsc};
use tonic::{Request, Response, Status, Streaming};

use crate::Config;

/// One EE model being trained.
struct Job {
    model: Model,
    opt: nn::Optimizer,
    kind: Kind,
    steps: u64,
}

/// The trainer service.
#[derive(Clone)]
pub struct TrainerService {
    config: Config,
    jobs: Arc<Mutex<HashMap<String, Arc<StdMutex<Job>>>>>,
}

fn parse_spec(spec: &JobSpec) -> Result<(Architecture, OptimizerSpec, Kind), Status> {
    let cfg = Architecture::from_parts(&spec.architecture, &spec.config_json)
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let kind = match spec.dtype.as_str() {
        "f32" | "" => Kind::Float,
        "f64" => Kind::Double,
        d => {
            return Err(Status::invalid_argument(format!(
                "dtype `{d}` is not supported: use f32 or f64"
            )));
        }
    };
    let o = spec
        .optimizer
        .clone()
        .ok_or_else(|| Status::invalid_argument("optimizer is required"))?;
    let finite_nonneg = |v: f64, name: &str| {
        if v.is_finite() && v >= 0.0 {
            Ok(v)
        } else {
            Err(Status::invalid_argument(format!(
                "optimizer {name} must be finite and >= 0, got {v}"
            )))
        }
    };
    if !(o.learning_rate.is_finite() && o.learning_rate > 0.0) {
        return Err(Status::invalid_argument(format!(
            "learning rate must be positive, got {}",
            o.learning_rate
        )));
    }
    let opt = match o.kind.as_str() {
        "adamw" => OptimizerSpec::AdamW {
            lr: o.learning_rate,
            beta1: finite_nonneg(o.beta1, "beta1")?,
            beta2: finite_nonneg(o.beta2, "beta2")?,
            eps: finite_nonneg(o.eps, "eps")?,
            weight_decay: finite_nonneg(o.weight_decay, "weight_decay")?,
        },
        "sgd" => OptimizerSpec::Sgd {
            lr: o.learning_rate,
            momentum: finite_nonneg(o.momentum, "momentum")?,
            weight_decay: finite_nonneg(o.weight_decay, "weight_decay")?,
        },
        k => {
            return Err(Status::invalid_argument(format!(
                "optimizer `{k}` is not supported: use adamw or sgd"
            )));
        }
    };
    Ok((cfg, opt, kind))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<Chunk, Status>> + Send>>;
type StepStream = Pin<Box<dyn Stream<Item = Result<StepResult, Status>> + Send>>;
type TokenStream = Pin<Box<dyn Stream<Item = Result<GeneratedToken, Status>> + Send>>;

impl TrainerService {
    /// A trainer with no jobs.
    pub fn new(config: Config) -> Self {
        Self {
            config,
            jobs: Arc::default(),
        }
    }

    /// The tonic server wrapping this service.
    pub fn into_server(self) -> TrainerServer<Self> {
        TrainerServer::new(self).max_decoding_message_size(16 << 20)
    }

    async fn job(&self, id: &str) -> Result<Arc<StdMutex<Job>>, Status> {
        self.jobs
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no job `{id}`: create it with CreateJob")))
    }
}

/// Only certificates with the `client` role (the key holder's or an inference client's) may
/// use the trainer; rustls has already checked they come from the configured CA.
fn authorize<T>(req: &Request<T>) -> Result<(), Status> {
    match fedee_proto::pki::peer_identity(req)? {
        Some(p) if p.role != fedee_proto::pki::Role::Client => {
            tracing::warn!(peer = %p.name, role = p.role.as_str(), "trainer request refused");
            Err(Status::permission_denied(format!(
                "certificate `{}` has role {}; the trainer serves only client certificates",
                p.name,
                p.role.as_str()
            )))
        }
        _ => Ok(()),
    }
}

fn lock(job: &StdMutex<Job>) -> std::sync::MutexGuard<'_, Job> {
    job.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Features and client-side embeddings take the job's dtype; token ids stay int64.
fn to_kind(input: Input, kind: Kind) -> Input {
    match input {
        Input::Features(x) => Input::Features(x.to_kind(kind)),
        Input::Embedded { x, mask } => Input::Embedded {
            x: x.to_kind(kind),
            mask,
        },
        tokens => tokens,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, Status> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))?
}

#[tonic::async_trait]
impl Trainer for TrainerService {
    async fn create_job(
        &self,
        req: Request<Streaming<CreateJobMessage>>,
    ) -> Result<Response<CreateJobResponse>, Status> {
        authorize(&req)?;
        let mut stream = req.into_inner();
        let Some(create_job_message::Msg::Spec(spec)) = stream.message().await?.and_then(|m| m.msg)
        else {
            return Err(Status::invalid_argument(
                "the first message must be a JobSpec",
            ));
        };
        let (cfg, opt_spec, kind) = parse_spec(&spec)?;
        if spec.model_size > self.config.max_model_bytes {
            return Err(Status::resource_exhausted(format!(
                "model of {} bytes exceeds this trainer's limit of {} bytes",
                spec.model_size, self.config.max_model_bytes
            )));
        }
        let mut r = Reassembler::new(spec.model_size);
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(create_job_message::Msg::Chunk(c)) => r
                    .push(c)
                    .map_err(|e| Status::invalid_argument(format!("model stream: {e}")))?,
                _ => {
                    return Err(Status::invalid_argument(
                        "after the JobSpec, send only chunks",
                    ));
                }
            }
        }
        let bytes = r
            .finish()
            .map_err(|e| Status::invalid_argument(format!("model stream: {e}")))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        if !sha.eq_ignore_ascii_case(&spec.sha256) {
            return Err(Status::invalid_argument(format!(
                "SHA-256 mismatch: spec says {}, bytes hash to {sha}",
                spec.sha256
            )));
        }
        let device = self.config.device;
        let arch = cfg.clone();
        let job = blocking(move || {
            let state = state_from_safetensors(&bytes, device)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let model = Model::from_state(arch, &state, device, kind)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let opt = model
                .optimizer(&opt_spec)
                .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Job {
                model,
                opt,
                kind,
                steps: 0,
            })
        })
        .await?;
        let id = format!("job-{:016x}", rand::rng().random::<u64>());
        self.jobs
            .lock()
            .await
            .insert(id.clone(), Arc::new(StdMutex::new(job)));
        let num_parameters: i64 = cfg
            .shapes()
            .values()
            .map(|s| s.iter().product::<i64>())
            .sum();
        tracing::info!(job = %id, architecture = cfg.name(), parameters = num_parameters, "job created");
        Ok(Response::new(CreateJobResponse {
            job_id: id,
            num_parameters: num_parameters as u64,
        }))
    }

    type TrainStream = StepStream;

    async fn train(
        &self,
        req: Request<Streaming<TrainBatch>>,
    ) -> Result<Response<StepStream>, Status> {
        authorize(&req)?;
        let mut stream = req.into_inner();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let batch = match stream.message().await {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        break;
                    }
                };
                let result = match this.job(&batch.job_id).await {
                    Ok(job) => {
                        let device = this.config.device;
                        blocking(move || {
                            let mut j = lock(&job);
                            let (input, y) =
                                batch_from_safetensors(&batch.batch, &j.model.arch, device)
                                    .map_err(|e| Status::invalid_argument(format!("batch: {e}")))?;
                            let input = to_kind(input, j.kind);
                            let Job {
                                model, opt, steps, ..
                            } = &mut *j;
                            // A causal LM learns from its input ids shifted; classifiers from y.
                            let loss = match &y {
                                Some(y) => model.train_step(opt, &input, y),
                                None => model.train_step_causal(opt, &input),
                            }
                            .map_err(|e| Status::invalid_argument(e.to_string()))?;
                            *steps += 1;
                            Ok(StepResult { step: *steps, loss })
                        })
                        .await
                    }
                    Err(s) => Err(s),
                };
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn predict(
        &self,
        req: Request<PredictRequest>,
    ) -> Result<Response<PredictResponse>, Status> {
        authorize(&req)?;
        let req = req.into_inner();
        let job = self.job(&req.job_id).await?;
        let device = self.config.device;
        let outputs = blocking(move || {
            let j = lock(&job);
            let (input, _) = batch_from_safetensors(&req.batch, &j.model.arch, device)
                .map_err(|e| Status::invalid_argument(format!("batch: {e}")))?;
            let logits = tch::no_grad(|| j.model.forward(&to_kind(input, j.kind)))
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            let mut s = fedee_model::StateDict::new();
            s.insert("logits".into(), logits);
            state_to_safetensors(&s).map_err(|e| Status::internal(e.to_string()))
        })
        .await?;
        Ok(Response::new(PredictResponse { outputs }))
    }

    type GenerateStream = TokenStream;

    async fn generate(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<TokenStream>, Status> {
        authorize(&req)?;
        let req = req.into_inner();
        let job = self.job(&req.job_id).await?;
        let invalid = |m: String| Status::invalid_argument(m);
        let sampling = Sampling {
            temperature: req.temperature,
            top_p: if req.top_p == 0.0 { 1.0 } else { req.top_p },
            top_k: req.top_k as usize,
            seed: req.seed,
        };
        let device = self.config.device;
        let (vocab, mut generation) = {
            let j = lock(&job);
            let Some((c, _)) = j.model.llama() else {
                return Err(Status::failed_precondition(format!(
                    "job `{}` is not a causal LM: Generate needs a `llama` job",
                    req.job_id
                )));
            };
            let g = Generation::new(
                c,
                req.prompt_ids.clone(),
                req.max_tokens as usize,
                req.stop_ids.clone(),
                sampling,
                (j.kind, device),
            )
            .map_err(|e| invalid(e.to_string()))?;
            (c.vocab_size as i64, g)
        };
        let prompt = req.prompt_ids;
        for (what, ids) in [("prompt", &prompt), ("stop", &req.stop_ids)] {
            if let Some(bad) = ids.iter().find(|&&i| !(0..vocab).contains(&i)) {
                return Err(invalid(format!(
                    "{what} id {bad} is outside the vocabulary 0..{vocab}"
                )));
            }
        }
        if let Some(log) = &self.config.prompt_log {
            let _ = log.send(prompt.clone());
        }
        let (tx, rx) = mpsc::channel(16);
        tracing::info!(job = %req.job_id, prompt_tokens = prompt.len(), max_tokens = req.max_tokens, "generate");
        tokio::task::spawn_blocking(move || {
            let _guard = tch::no_grad_guard();
            loop {
                let step = {
                    let j = lock(&job);
                    let (c, s) = j.model.llama().expect("checked above");
                    generation.step(c, s)
                };
                let (token, finish) = match step {
                    Ok(t) => t,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Status::internal(format!("decoding: {e}"))));
                        return;
                    }
                };
                let msg = GeneratedToken {
                    token_id: token,
                    finish_reason: finish.map_or("", Finish::as_str).into(),
                };
                // A closed channel: the client went away, so stop decoding.
                if tx.blocking_send(Ok(msg)).is_err() || finish.is_some() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ExportModelStream = ChunkStream;

    async fn export_model(
        &self,
        req: Request<ExportModelRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        authorize(&req)?;
        let job = self.job(&req.into_inner().job_id).await?;
        let bytes = blocking(move || {
            state_to_safetensors(&lock(&job).model.state())
                .map_err(|e| Status::internal(e.to_string()))
        })
        .await?;
        Ok(Response::new(Box::pin(futures::stream::iter(
            chunks(&bytes).into_iter().map(Ok),
        ))))
    }
}
