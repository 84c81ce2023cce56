//! Client of the trainer, used by the key holder (pharma) and inference clients. It sends
//! only EE models and encrypted batches; encryption and decryption happen before and after,
//! with `fedee-encrypt`, on the client's side.

use fedee_proto::v1::trainer_client::TrainerClient as Grpc;
use fedee_proto::v1::{
    CreateJobMessage, ExportModelRequest, GenerateRequest, GeneratedToken, JobSpec,
    OptimizerSpec as WireOptimizer, PredictRequest, TrainBatch, create_job_message,
};
use fedee_proto::{MAX_BLOB_SIZE, Reassembler, chunks};
use sha2::{Digest, Sha256};
use tonic::transport::Channel;

use fedee_model::{Architecture, OptimizerSpec};

/// Errors talking to the trainer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Cannot connect.
    #[error("cannot reach the trainer at {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    /// The trainer refused a call.
    #[error("trainer refused {call}: {status}")]
    Rpc {
        call: &'static str,
        status: tonic::Status,
    },
    /// TLS material could not be loaded.
    #[error("TLS: {0}")]
    Tls(#[from] fedee_proto::pki::PkiError),
    /// A malformed stream from the trainer.
    #[error("stream: {0}")]
    Stream(#[from] fedee_proto::ChunkError),
}

fn rpc(call: &'static str) -> impl Fn(tonic::Status) -> ClientError {
    move |status| ClientError::Rpc { call, status }
}

/// A connection to a trainer.
#[derive(Debug, Clone)]
pub struct TrainerClient {
    inner: Grpc<Channel>,
}

impl TrainerClient {
    /// Connect to `url` (e.g. `http://127.0.0.1:50052`, or `https://` with `tls`).
    ///
    /// # Errors
    /// [`ClientError::Connect`] when the trainer cannot be reached or its certificate is
    /// refused; [`ClientError::Tls`] for a malformed URL or unusable TLS files.
    ///
    /// # Security
    /// With TLS the trainer must present a certificate valid for the host dialled and
    /// carrying the `trainer` role.
    pub async fn connect(
        url: &str,
        tls: Option<&fedee_proto::pki::TlsFiles>,
    ) -> Result<Self, ClientError> {
        let channel = fedee_proto::pki::connect(
            url,
            tls,
            fedee_proto::pki::Role::Trainer,
            std::time::Duration::from_secs(10),
        )
        .await?
        .map_err(|source| ClientError::Connect {
            url: url.to_owned(),
            source,
        })?;
        let inner = Grpc::new(channel);
        Ok(Self {
            inner: inner.max_decoding_message_size(16 << 20),
        })
    }

    /// Upload an EE model (safetensors) and create a training job; returns the job id.
    ///
    /// # Errors
    /// [`ClientError::Rpc`] if the trainer rejects the spec or the model.
    pub async fn create_job(
        &mut self,
        arch: &Architecture,
        optimizer: &OptimizerSpec,
        dtype: &str,
        ee_model: &[u8],
    ) -> Result<String, ClientError> {
        let optimizer = match *optimizer {
            OptimizerSpec::AdamW {
                lr,
                beta1,
                beta2,
                eps,
                weight_decay,
            } => WireOptimizer {
                kind: "adamw".into(),
                learning_rate: lr,
                beta1,
                beta2,
                eps,
                weight_decay,
                momentum: 0.0,
            },
            OptimizerSpec::Sgd {
                lr,
                momentum,
                weight_decay,
            } => WireOptimizer {
                kind: "sgd".into(),
                learning_rate: lr,
                momentum,
                weight_decay,
                ..Default::default()
            },
        };
        let spec = JobSpec {
            architecture: arch.name().into(),
            config_json: arch.config_json(),
            optimizer: Some(optimizer),
            dtype: dtype.into(),
            model_size: ee_model.len() as u64,
            sha256: hex::encode(Sha256::digest(ee_model)),
        };
        let msgs: Vec<CreateJobMessage> = std::iter::once(create_job_message::Msg::Spec(spec))
            .chain(
                chunks(ee_model)
                    .into_iter()
                    .map(create_job_message::Msg::Chunk),
            )
            .map(|m| CreateJobMessage { msg: Some(m) })
            .collect();
        let r = self
            .inner
            .create_job(futures::stream::iter(msgs))
            .await
            .map_err(rpc("CreateJob"))?;
        Ok(r.into_inner().job_id)
    }

    /// Stream encrypted batches (safetensors `x`, `y`) to the job; `on_step(step, loss)` is
    /// called for every step result as it arrives. Returns the losses.
    ///
    /// # Errors
    /// [`ClientError::Rpc`] on the first rejected batch.
    pub async fn train(
        &mut self,
        job_id: &str,
        batches: Vec<Vec<u8>>,
        mut on_step: impl FnMut(u64, f64),
    ) -> Result<Vec<f64>, ClientError> {
        let job = job_id.to_owned();
        let reqs = futures::stream::iter(batches.into_iter().map(move |batch| TrainBatch {
            job_id: job.clone(),
            batch,
        }));
        let mut results = self
            .inner
            .train(reqs)
            .await
            .map_err(rpc("Train"))?
            .into_inner();
        let mut losses = vec![];
        while let Some(r) = results.message().await.map_err(rpc("Train"))? {
            on_step(r.step, r.loss);
            losses.push(r.loss);
        }
        Ok(losses)
    }

    /// Run the job's model on an encrypted batch; returns safetensors with encrypted `logits`.
    ///
    /// # Errors
    /// [`ClientError::Rpc`].
    pub async fn predict(&mut self, job_id: &str, batch: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let r = self
            .inner
            .predict(PredictRequest {
                job_id: job_id.into(),
                batch,
            })
            .await
            .map_err(rpc("Predict"))?;
        Ok(r.into_inner().outputs)
    }

    /// Generate from an encrypted prompt with a causal LM job: the stream yields encrypted
    /// token ids as the trainer decodes them; the last one carries the finish reason. Dropping
    /// the stream cancels the generation at the trainer.
    ///
    /// # Errors
    /// [`ClientError::Rpc`] if the trainer refuses the request (the stream's items carry later
    /// failures).
    pub async fn generate(
        &mut self,
        request: GenerateRequest,
    ) -> Result<tonic::Streaming<GeneratedToken>, ClientError> {
        Ok(self
            .inner
            .generate(request)
            .await
            .map_err(rpc("Generate"))?
            .into_inner())
    }

    /// Download the job's current EE model (safetensors).
    ///
    /// # Errors
    /// [`ClientError::Rpc`] or a malformed stream.
    pub async fn export_model(&mut self, job_id: &str) -> Result<Vec<u8>, ClientError> {
        let mut s = self
            .inner
            .export_model(ExportModelRequest {
                job_id: job_id.into(),
            })
            .await
            .map_err(rpc("ExportModel"))?
            .into_inner();
        let mut r = Reassembler::new(MAX_BLOB_SIZE);
        while let Some(c) = s.message().await.map_err(rpc("ExportModel"))? {
            r.push(c)?;
        }
        Ok(r.finish()?)
    }
}
