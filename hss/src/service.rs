//! gRPC for HSS-EE: the `HssServer` service (`fedee hss-server`) and [`Remote`], the client's
//! transport to two of them.
//!
//! # Security
//! Mutual TLS: a server accepts only certificates with the `client` role from the
//! consortium's CA; its own certificate has the `hss` role (`fedee certs issue --hss`), and
//! the client dials only that role. The two servers never talk to each other. A server logs request shapes, never
//! share contents.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fedee_model::{StateDict, state_from_safetensors, state_to_safetensors};
use fedee_proto::pki::{Role, TlsFiles};
use fedee_proto::v1::hss_server_client::HssServerClient;
use fedee_proto::v1::hss_server_server::{HssServer, HssServerServer};
use fedee_proto::v1::{
    HssLinearRequest, HssLinearResponse, HssLoadMessage, HssLoadResponse, HssMapScales,
    HssModelHeader, hss_linear_request, hss_load_message,
};
use fedee_proto::{Reassembler, chunks};
use sha2::{Digest, Sha256};
use tch::Device;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use crate::client::Servers;
use crate::engine::Engine;
use crate::server::{HssModel, LinearRequest, MAX_SHARE_WORDS, Share};
use crate::{HssError, Result};

/// Largest gRPC message either side accepts: a share or an answer of
/// [`MAX_SHARE_WORDS`] words and a little framing.
const MAX_MESSAGE: usize = 8 * MAX_SHARE_WORDS + (1 << 20);

/// Server settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// How shares are multiplied.
    pub engine: Engine,
    /// Largest uploaded model, bytes.
    pub max_model_bytes: u64,
    /// Models kept at once (the oldest is dropped beyond).
    pub max_models: usize,
    /// Mutual TLS; `None` = plaintext (loopback tests only).
    pub tls: Option<TlsFiles>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            engine: Engine::Int64,
            max_model_bytes: 2 << 30,
            max_models: 4,
            tls: None,
        }
    }
}

type Models = Arc<Mutex<Vec<(String, Arc<Mutex<HssModel>>)>>>;

/// The `HssServer` service.
pub struct Service {
    config: Config,
    models: Models,
}

fn authorize<T>(req: &Request<T>) -> Result<(), Status> {
    match fedee_proto::pki::peer_identity(req)? {
        Some(p) if p.role != Role::Client => Err(Status::permission_denied(format!(
            "certificate `{}` has role {}; an HSS server serves only client certificates",
            p.name,
            p.role.as_str()
        ))),
        _ => Ok(()),
    }
}

fn status(e: HssError) -> Status {
    match e {
        HssError::Invalid(m) | HssError::Range(m) => Status::invalid_argument(m),
        e => Status::internal(e.to_string()),
    }
}

#[tonic::async_trait]
impl HssServer for Service {
    async fn load_model(
        &self,
        req: Request<Streaming<HssLoadMessage>>,
    ) -> Result<Response<HssLoadResponse>, Status> {
        authorize(&req)?;
        let mut stream = req.into_inner();
        let Some(hss_load_message::Msg::Header(h)) = stream.message().await?.and_then(|m| m.msg)
        else {
            return Err(Status::invalid_argument(
                "the first message must be a header",
            ));
        };
        if h.model_size > self.config.max_model_bytes {
            return Err(Status::resource_exhausted(format!(
                "a model of {} bytes exceeds this server's limit of {}",
                h.model_size, self.config.max_model_bytes
            )));
        }
        let mut r = Reassembler::new(h.model_size);
        while let Some(m) = stream.message().await? {
            match m.msg {
                Some(hss_load_message::Msg::Chunk(c)) => r
                    .push(c)
                    .map_err(|e| Status::invalid_argument(format!("model stream: {e}")))?,
                _ => {
                    return Err(Status::invalid_argument(
                        "after the header, send only chunks",
                    ));
                }
            }
        }
        let bytes = r
            .finish()
            .map_err(|e| Status::invalid_argument(format!("model stream: {e}")))?;
        let id = hex::encode(Sha256::digest(&bytes));
        if !id.eq_ignore_ascii_case(&h.sha256) {
            return Err(Status::invalid_argument(format!(
                "SHA-256 mismatch: header says {}, bytes hash to {id}",
                h.sha256
            )));
        }
        let engine = self.config.engine;
        let model = tokio::task::spawn_blocking(move || {
            let state = state_from_safetensors(&bytes, Device::Cpu)
                .map_err(|e| Status::invalid_argument(format!("not a safetensors model: {e}")))?;
            HssModel::from_state(&state, engine).map_err(status)
        })
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))??;
        let maps = model
            .weight_frac_bits()
            .into_iter()
            .map(|(name, f)| HssMapScales {
                name,
                frac_bits: f.into_iter().map(|b| b as u8).collect(),
            })
            .collect();
        let (n, w) = model.size();
        tracing::info!(model = %id, maps = n, weights = w, "HSS model loaded");
        let mut models = self.models.lock().expect("models lock");
        models.retain(|(m, _)| *m != id);
        if models.len() >= self.config.max_models {
            models.remove(0);
        }
        models.push((id.clone(), Arc::new(Mutex::new(model))));
        Ok(Response::new(HssLoadResponse { model_id: id, maps }))
    }

    async fn linear(
        &self,
        req: Request<HssLinearRequest>,
    ) -> Result<Response<HssLinearResponse>, Status> {
        authorize(&req)?;
        let r = req.into_inner();
        let model = self
            .models
            .lock()
            .expect("models lock")
            .iter()
            .find(|(m, _)| *m == r.model_id)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no model `{}` on this server: load it with LoadModel",
                    r.model_id
                ))
            })?;
        let share = match r.share {
            Some(hss_linear_request::Share::Seed(s)) => {
                Share::Seed(s.try_into().map_err(|s: Vec<u8>| {
                    Status::invalid_argument(format!("a seed of {} bytes, not 32", s.len()))
                })?)
            }
            Some(hss_linear_request::Share::Words(w)) => {
                if !w.len().is_multiple_of(8) {
                    return Err(Status::invalid_argument(format!(
                        "{} share bytes are not whole u64 words",
                        w.len()
                    )));
                }
                Share::Words(
                    w.chunks_exact(8)
                        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
                        .collect(),
                )
            }
            None => return Err(Status::invalid_argument("a request without a share")),
        };
        let lr = LinearRequest {
            maps: r.maps,
            rows: r.rows as usize,
            cols: r.cols as usize,
            frac_bits: r.frac_bits,
            share,
        };
        let outputs = tokio::task::spawn_blocking(move || {
            model
                .lock()
                .expect("model lock")
                .linear(&lr)
                .map_err(status)
        })
        .await
        .map_err(|e| Status::internal(format!("worker failed: {e}")))??;
        Ok(Response::new(HssLinearResponse {
            outputs: outputs.into_iter().map(|y| to_bytes(&y)).collect(),
        }))
    }
}

fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

fn from_bytes(b: &[u8]) -> Result<Vec<u64>> {
    if !b.len().is_multiple_of(8) {
        return Err(HssError::Invalid(format!(
            "{} answer bytes are not whole words",
            b.len()
        )));
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Serve `HssServer` on `listener` until `shutdown` is cancelled.
///
/// # Errors
/// Transport or TLS failures.
pub async fn run(config: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = &config.tls {
        builder = builder
            .tls_config(t.server().map_err(|e| HssError::Transport(e.to_string()))?)
            .map_err(|e| HssError::Transport(e.to_string()))?;
    }
    let service = HssServerServer::new(Service {
        config,
        models: Models::default(),
    })
    .max_decoding_message_size(MAX_MESSAGE)
    .max_encoding_message_size(MAX_MESSAGE);
    builder
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
        .map_err(|e| HssError::Transport(e.to_string()))
}

/// The client's connection to two HSS servers, usable as [`Servers`] from a thread that is
/// not a tokio worker (e.g. inside `spawn_blocking`): each round trip blocks on `handle`.
pub struct Remote {
    clients: [HssServerClient<Channel>; 2],
    model_id: String,
    handle: tokio::runtime::Handle,
    /// Bytes of every gRPC message body sent and received (protobuf-encoded).
    pub wire_bytes: (u64, u64),
}

impl Remote {
    /// Connect to both servers (`https://` with `tls`) and upload `offloaded` to each; checks
    /// that both quantized it as `expected` (the client's own quantization).
    ///
    /// # Errors
    /// [`HssError::Transport`] when a server cannot be reached or refuses the model;
    /// [`HssError::Invalid`] when a server's quantization differs from the client's.
    pub async fn connect(
        urls: [&str; 2],
        tls: Option<&TlsFiles>,
        offloaded: &StateDict,
        expected: &BTreeMap<String, Vec<u32>>,
    ) -> Result<Self> {
        let bytes = state_to_safetensors(offloaded)
            .map_err(|e| HssError::Invalid(format!("cannot serialize the model: {e}")))?;
        let sha = hex::encode(Sha256::digest(&bytes));
        let mut clients = Vec::new();
        for url in urls {
            let channel = fedee_proto::pki::connect(url, tls, Role::Hss, Duration::from_secs(10))
                .await
                .map_err(|e| HssError::Transport(format!("{url}: {e}")))?
                .map_err(|e| HssError::Transport(format!("cannot reach HSS server {url}: {e}")))?;
            let mut c = HssServerClient::new(channel)
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            let msgs: Vec<HssLoadMessage> =
                std::iter::once(hss_load_message::Msg::Header(HssModelHeader {
                    model_size: bytes.len() as u64,
                    sha256: sha.clone(),
                }))
                .chain(chunks(&bytes).into_iter().map(hss_load_message::Msg::Chunk))
                .map(|m| HssLoadMessage { msg: Some(m) })
                .collect();
            let r = c
                .load_model(futures::stream::iter(msgs))
                .await
                .map_err(|s| {
                    HssError::Transport(format!("{url} refused the model: {}", s.message()))
                })?
                .into_inner();
            let got: BTreeMap<String, Vec<u32>> = r
                .maps
                .into_iter()
                .map(|m| (m.name, m.frac_bits.into_iter().map(u32::from).collect()))
                .collect();
            if &got != expected || r.model_id != sha {
                return Err(HssError::Invalid(format!(
                    "{url} quantized the model differently from this client: it runs another build or holds another model"
                )));
            }
            clients.push(c);
        }
        let clients: [HssServerClient<Channel>; 2] = clients.try_into().expect("two servers");
        Ok(Self {
            clients,
            model_id: sha,
            handle: tokio::runtime::Handle::current(),
            wire_bytes: (0, 0),
        })
    }
}

fn wire(r: &LinearRequest, model_id: &str) -> HssLinearRequest {
    HssLinearRequest {
        model_id: model_id.to_owned(),
        maps: r.maps.clone(),
        rows: r.rows as u32,
        cols: r.cols as u32,
        frac_bits: r.frac_bits,
        share: Some(match &r.share {
            Share::Seed(s) => hss_linear_request::Share::Seed(s.to_vec()),
            Share::Words(w) => hss_linear_request::Share::Words(to_bytes(w)),
        }),
    }
}

impl Servers for Remote {
    fn round_trip(&mut self, requests: [LinearRequest; 2]) -> Result<[Vec<Vec<u64>>; 2]> {
        use prost::Message;
        let [w0, w1] = [
            wire(&requests[0], &self.model_id),
            wire(&requests[1], &self.model_id),
        ];
        self.wire_bytes.0 += (w0.encoded_len() + w1.encoded_len()) as u64;
        let [c0, c1] = &mut self.clients;
        let (a, b) = self
            .handle
            .block_on(async { tokio::join!(c0.linear(w0), c1.linear(w1)) });
        let mut out = Vec::with_capacity(2);
        for (i, r) in [a, b].into_iter().enumerate() {
            let r = r
                .map_err(|s| HssError::Transport(format!("HSS server {i}: {}", s.message())))?
                .into_inner();
            self.wire_bytes.1 += r.encoded_len() as u64;
            out.push(
                r.outputs
                    .iter()
                    .map(|o| from_bytes(o))
                    .collect::<Result<Vec<_>>>()?,
            );
        }
        let [y0, y1]: [Vec<Vec<u64>>; 2] = out.try_into().expect("two answers");
        Ok([y0, y1])
    }
}
