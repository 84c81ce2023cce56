//! `fedee`: one CLI for every fedee role. Thin glue over the library crates.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use fedee_encrypt::{KeyGroup, KeySet};
use fedee_lab::{attack, bench, demo};
use fedee_model::{state_from_safetensors, state_to_safetensors};
use fedee_proto::cli::{
    TransportArgs, init_tracing, notice, serve_with_grace, shutdown_on_signals,
};
use fedee_proto::pki::Role;
use fedee_site_agent::client::{Link, Retry};
use rand::SeedableRng;
use tch::Device;

/// Federated learning with differential privacy, and fine-tuning and inference on
/// equivariantly encrypted (EE) models.
///
/// Roles: hospitals run `fedee site`, the consortium runs `fedee aggregator`, the compute
/// provider runs `fedee trainer`, and the key holder uses `fedee ee`. `fedee demo` runs the
/// whole main job on one machine.
///
/// EE is a secret change of basis, not semantically secure encryption: see SECURITY.md for
/// what the trainer still sees.
#[derive(Parser)]
#[command(name = "fedee", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job end to end: FedAvg with DP on three hospitals, EE fine-tuning at a
    /// trainer, encrypted inference; writes a JSON report.
    Demo(demo::DemoArgs),
    /// Run the federation service (rounds, FedAvg, privacy accounting).
    Aggregator(fedee_aggregator::cli::AggregatorArgs),
    /// Run a site agent next to a hospital's data (trains what the federation spec says).
    Site(fedee_site_agent::cli::SiteArgs),
    /// Scaffold a federation spec (federation.toml) from a data file.
    Init(fedee_site_agent::cli::InitArgs),
    /// Run the trainer service (EE models and encrypted batches only; never keys).
    Trainer(TrainerArgs),
    /// Run one of the two non-colluding HSS-EE servers: computes an EE model's linear maps on
    /// additive shares in Z_2^64 for `fedee predict --hss A,B` (never sees keys, ids or
    /// activations; the two servers must be run by parties that do not collude).
    HssServer(fedee_hss::cli::HssServerArgs),
    /// Fine-tune a model at the trainer under EE on your own data file (key holder).
    Finetune(fedee_client::cli::FinetuneArgs),
    /// Class probabilities for your records from an EE model at the trainer (key holder).
    Predict(fedee_client::cli::PredictArgs),
    /// A local OpenAI-compatible chat endpoint for an EE language model at the trainer (key
    /// holder): encrypts prompts, decrypts the streamed answers.
    ChatProxy(fedee_client::cli::ChatProxyArgs),
    /// Fine-tune an EE language model at the trainer on your own texts (key holder).
    LmFinetune(fedee_client::cli::LmFinetuneArgs),
    /// Create an initial global model (safetensors) for the aggregator: the MLP of a
    /// federation spec, or the demo's heart MLP.
    InitModel(InitModelArgs),
    /// Show an aggregator's rounds, sites' accuracy and the privacy spent.
    Status {
        /// Aggregator address (host:port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        aggregator: String,
        #[command(flatten)]
        transport: TransportArgs,
    },
    /// Download a global model from the aggregator (model R + 1 is the result of R rounds).
    DownloadModel {
        /// Aggregator address (host:port).
        #[arg(long, default_value = "127.0.0.1:50051")]
        aggregator: String,
        #[command(flatten)]
        transport: TransportArgs,
        /// Global model number (1 = initial, r + 1 = the result of round r), `final` (the last
        /// closed round's), or `selected` (the one with the best validation accuracy over the
        /// sites' validation splits, as `fedee status` shows).
        #[arg(long)]
        model: String,
        /// Output path (safetensors).
        #[arg(long)]
        out: PathBuf,
    },
    /// Equivariant encryption: keys and model transforms (key holder side).
    #[command(subcommand)]
    Ee(EeCommand),
    /// The consortium PKI for mutual TLS: a CA and certificates for sites, services, clients.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Benchmarks: print a table and optionally write JSON (units in the key names).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the consortium CA: DIR/ca.pem and DIR/ca.key (mode 0600). Refuses to replace
    /// an existing CA (that would invalidate every certificate it issued) without --force.
    Init {
        /// PKI directory.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// Consortium name (in the CA's subject).
        #[arg(long, default_value = "fedee consortium")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: i64,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// A bearer token for the aggregator's dashboard (`fedee aggregator --dashboard-listen
    /// ADDR --dashboard-token-hash FILE`): prints a fresh random token once on stdout and
    /// writes only its SHA-256 to FILE (mode 0600). Sign in with it in the browser, or send
    /// `Authorization: Bearer TOKEN` to /api/.
    DashboardToken {
        /// Where the token's SHA-256 goes.
        #[arg(
            long,
            value_name = "FILE",
            default_value = "pki/dashboard-token.sha256"
        )]
        out: PathBuf,
        /// Replace an existing hash file (the old token stops working).
        #[arg(long)]
        force: bool,
    },
    /// Issue a certificate signed by the CA: DIR/NAME.pem and DIR/NAME.key (mode 0600), with
    /// the role in its subject OU. Exactly one of --site, --aggregator, --trainer, --client,
    /// --operator, --hss. Clients check the role of the service they reach: a site talks only
    /// to an aggregator certificate, pharma only to a trainer one, an HSS client only to `hss`
    /// ones.
    #[command(group(clap::ArgGroup::new("role").required(true).args(["site", "aggregator", "trainer", "client", "operator", "hss"])))]
    Issue {
        /// PKI directory holding the CA.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// A site agent's certificate; NAME is its identity at the aggregator.
        #[arg(long, value_name = "NAME")]
        site: Option<String>,
        /// The aggregator's service certificate, valid for the --host names.
        #[arg(long, value_name = "NAME")]
        aggregator: Option<String>,
        /// The trainer's service certificate, valid for the --host names.
        #[arg(long, value_name = "NAME")]
        trainer: Option<String>,
        /// A trainer client's certificate (pharma, an inference client).
        #[arg(long, value_name = "NAME")]
        client: Option<String>,
        /// An HSS-EE server's service certificate (`fedee hss-server`), valid for the --host
        /// names. Issue the two servers' certificates to two parties that do not collude.
        #[arg(long, value_name = "NAME")]
        hss: Option<String>,
        /// The consortium operator's certificate: `fedee status` with it shows every site's
        /// figures; other certificates see only the federation's.
        #[arg(long, value_name = "NAME")]
        operator: Option<String>,
        /// Service certificates: a DNS name or IP address clients dial (repeatable), e.g.
        /// --host agg.example.org --host 10.0.0.5 [default: localhost and 127.0.0.1].
        #[arg(long = "host", value_name = "DNS_OR_IP")]
        hosts: Vec<String>,
        /// Validity in days (short-lived certificates are easier to trust).
        #[arg(long, default_value_t = 90)]
        days: i64,
        /// Replace existing files of that name.
        #[arg(long)]
        force: bool,
    },
}

#[derive(clap::Args)]
struct TrainerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:50052")]
    listen: SocketAddr,
    #[command(flatten)]
    transport: TransportArgs,
    /// Device: cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

#[derive(clap::Args)]
struct InitModelArgs {
    /// Output path (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The federation spec whose model to create: an MLP of its inputs, hidden sizes and
    /// classes, or its BERT checkpoint with a fresh classification head.
    #[arg(long)]
    spec: PathBuf,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    seed: i64,
}

#[derive(Subcommand)]
enum EeCommand {
    /// Generate secret keys (file written with permissions 0600) for the model of a
    /// federation spec (--spec), a BERT classifier of a Hugging Face config.json
    /// (--bert-config), or a causal LM in a GGUF file (--gguf).
    Keygen {
        /// Output key file (JSON). Keep it private; never send it to a server.
        #[arg(long)]
        out: PathBuf,
        /// Replace --out if it exists (the old keys then decrypt nothing new).
        #[arg(long)]
        force: bool,
        /// The federation spec whose model the keys are for (an MLP's sizes and activation, or
        /// a BERT checkpoint's config.json and the spec's classes).
        #[arg(
            long,
            required_unless_present_any = ["bert_config", "gguf"],
            conflicts_with_all = ["bert_config", "gguf"]
        )]
        spec: Option<PathBuf>,
        /// Generate keys for the Llama-family causal LM in this GGUF file instead (e.g.
        /// data/cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf).
        #[arg(long, conflicts_with = "bert_config")]
        gguf: Option<PathBuf>,
        /// Group of the MLP's input key: signed-permutation (default; AdamW-exact), permutation,
        /// orthogonal (SGD-exact), monomial or invertible (inference only).
        #[arg(long, default_value = "signed-permutation")]
        input_key: KeyGroup,
        /// Add an input offset δ to the MLP keys (inference only: breaks training equivariance).
        #[arg(long)]
        offset: bool,
        /// Generate keys for a BERT classifier with this Hugging Face config.json instead
        /// (e.g. data/cache/minilm/config.json).
        #[arg(long)]
        bert_config: Option<PathBuf>,
        /// BERT: number of classes of the head.
        #[arg(long, default_value_t = 3)]
        num_labels: usize,
        /// BERT and LM: finetune (permutations only; AdamW stays exact) or inference (adds
        /// general invertible per-head attention keys, and for the LM scaled FFN units;
        /// refused for training).
        #[arg(long, default_value = "finetune")]
        profile: fedee_model::Profile,
    },
    /// The encrypted tokenizer: tokenize text with the model's tokenizer.json and encrypt the
    /// ids with the key set's vocabulary permutation. Prints one JSON object per text.
    Tokenize {
        /// Key file of a BERT classifier (from `fedee ee keygen --bert-config`).
        #[arg(long)]
        keys: PathBuf,
        /// The model's tokenizer.json.
        #[arg(long, default_value = "data/cache/minilm/tokenizer.json")]
        tokenizer: PathBuf,
        /// Longest sequence, special tokens included.
        #[arg(long, default_value_t = 128)]
        max_len: usize,
        /// Warn when the tokens encrypted under this key file (counted in KEYS.usage.json)
        /// pass this many: frequency analysis decodes more of them as ciphertext accumulates
        /// (SECURITY.md). Rotate with `fedee ee rotate`.
        #[arg(long, env = "FEDEE_MAX_TOKENS_PER_KEY", default_value_t = fedee_encrypt::volume::DEFAULT_TOKEN_LIMIT)]
        max_tokens_per_key: u64,
        /// Texts to tokenize.
        #[arg(required = true)]
        text: Vec<String>,
    },
    /// Transform a plaintext model into its EE model.
    Encrypt {
        #[command(flatten)]
        files: TransformFiles,
    },
    /// Decrypt an EE model back to plaintext.
    Decrypt {
        #[command(flatten)]
        files: TransformFiles,
    },
    /// Re-key an EE model without retraining (key holder side): decrypt with --keys, draw new
    /// keys of the same groups into --new-keys (0600), transform into --out. Upload the new EE
    /// model to the trainer and switch every client to the new keys at once.
    Rotate {
        #[command(flatten)]
        files: TransformFiles,
        /// Where the new key file goes (must not exist).
        #[arg(long)]
        new_keys: PathBuf,
    },
    /// Measure what EE hides: attacks a server could run, with figures (SECURITY.md).
    #[command(subcommand)]
    Attack(attack::AttackCommand),
}

/// The files of a model transform.
#[derive(clap::Args)]
struct TransformFiles {
    /// Key file (from `fedee ee keygen`).
    #[arg(long)]
    keys: PathBuf,
    /// Input model (safetensors; for `encrypt`, a GGUF file too).
    #[arg(long)]
    model: PathBuf,
    /// Output model (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// The BERT config.json, for keys of a BERT classifier (e.g. data/cache/minilm/config.json).
    #[arg(long)]
    bert_config: Option<PathBuf>,
    /// The GGUF file of a causal LM, for its keys (its architecture; with `encrypt`, pass
    /// it as --model too).
    #[arg(long, conflicts_with = "bert_config")]
    gguf: Option<PathBuf>,
    /// The federation spec of the model (the key layout follows its MLP's sizes and
    /// activation, or its BERT checkpoint's config.json and classes).
    #[arg(
        long,
        required_unless_present_any = ["bert_config", "gguf"],
        conflicts_with_all = ["bert_config", "gguf"]
    )]
    spec: Option<PathBuf>,
}

/// A Llama-family GGUF file as f32 tensors, with its architecture.
fn load_gguf(p: &std::path::Path) -> Result<fedee_model::gguf::GgufModel> {
    Ok(fedee_model::gguf::load(
        p,
        fedee_model::gguf::RopeLayout::HalfSplit,
    )?)
}

/// Read and validate a federation spec file.
fn read_spec(p: &std::path::Path) -> Result<fedee_spec::FederationSpec> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("reading the federation spec {}", p.display()))?;
    fedee_spec::FederationSpec::from_toml(&text)
        .with_context(|| format!("{} is not a valid federation spec", p.display()))
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    // Services log their progress (rounds, updates, refusals); one-shot commands only warnings.
    init_tracing(match cli.command {
        Command::Aggregator(_) | Command::Site(_) | Command::Trainer(_) | Command::HssServer(_) => {
            "info"
        }
        _ => "warn",
    });
    match cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Bench(b) => bench::run(b),
        Command::Aggregator(a) => fedee_aggregator::cli::run(a).await,
        Command::Site(s) => fedee_site_agent::cli::run(s).await,
        Command::Init(i) => fedee_site_agent::cli::init(i),
        Command::Finetune(a) => fedee_client::cli::finetune(a).await,
        Command::Predict(a) => fedee_client::cli::predict(a).await,
        Command::ChatProxy(a) => fedee_client::cli::chat_proxy(a).await,
        Command::LmFinetune(a) => fedee_client::cli::lm_finetune(a).await,
        Command::Trainer(t) => {
            let config = fedee_trainer::Config {
                device: fedee_site_agent::cli::parse_device(&t.device)?,
                tls: t.transport.resolve("trainer")?,
                ..Default::default()
            };
            let listener = tokio::net::TcpListener::bind(t.listen)
                .await
                .with_context(|| format!("binding {}", t.listen))?;
            notice(
                false,
                &format!("trainer listening on {}", listener.local_addr()?),
            );
            let token = shutdown_on_signals();
            serve_with_grace(token.clone(), fedee_trainer::run(config, listener, token)).await?;
            notice(false, "trainer stopped");
            Ok(())
        }
        Command::HssServer(h) => fedee_hss::cli::serve(h).await,
        Command::InitModel(i) => {
            let state = fedee_site_agent::task::initial_model(&read_spec(&i.spec)?, i.seed)?;
            std::fs::write(&i.out, state_to_safetensors(&state)?)
                .with_context(|| format!("writing {}", i.out.display()))?;
            let n: i64 = state
                .values()
                .map(tch::Tensor::numel)
                .map(|n| n as i64)
                .sum();
            eprintln!(
                "wrote initial model ({n} parameters) to {}",
                i.out.display()
            );
            Ok(())
        }
        Command::Status {
            aggregator,
            transport,
        } => {
            let tls = transport.resolve("pharma")?;
            let url = format!("{}://{aggregator}", transport.scheme());
            let st = Link::connect(&url, tls.as_ref(), Retry::default())?
                .status()
                .await?;
            print!("{}", fedee_aggregator::cli::render_status(&st));
            Ok(())
        }
        Command::DownloadModel {
            aggregator,
            transport,
            model,
            out,
        } => {
            let tls = transport.resolve("pharma")?;
            let url = format!("{}://{aggregator}", transport.scheme());
            let link = Link::connect(&url, tls.as_ref(), Retry::default())?;
            fedee_client::cli::download_model(link, &model, &out).await
        }
        Command::Ee(cmd) => ee(cmd),
        Command::Certs(CertsCommand::DashboardToken { out, force }) => {
            let token = fedee_aggregator::dashboard::new_token(&out, force)?;
            println!("{token}");
            eprintln!(
                "dashboard token printed above (shown once; only its SHA-256 is kept, in {}): start the aggregator with --dashboard-token-hash {}",
                out.display(),
                out.display()
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Init {
            dir,
            name,
            days,
            force,
        }) => {
            fedee_proto::pki::init_ca(&dir, &name, days, force)?;
            eprintln!(
                "created CA `{name} CA` in {} (ca.pem; ca.key is 0600: keep it offline)",
                dir.display()
            );
            Ok(())
        }
        Command::Certs(CertsCommand::Issue {
            dir,
            site,
            aggregator,
            trainer,
            client,
            operator,
            hss,
            hosts,
            days,
            force,
        }) => {
            let (role, name) = [
                (Role::Site, site),
                (Role::Aggregator, aggregator),
                (Role::Trainer, trainer),
                (Role::Client, client),
                (Role::Operator, operator),
                (Role::Hss, hss),
            ]
            .into_iter()
            .find_map(|(r, n)| n.map(|n| (r, n)))
            .context("pass one of --site, --aggregator, --trainer, --client, --operator, --hss")?;
            if !hosts.is_empty() && !role.is_service() {
                bail!("--host is for service certificates (--aggregator, --trainer, --hss)");
            }
            let req = fedee_proto::pki::CertRequest {
                hosts,
                ..fedee_proto::pki::CertRequest::new(role, &name, days)
            };
            let (pem, key) = fedee_proto::pki::issue(&dir, &req, force)?;
            let hosts = if role.is_service() {
                format!(" for {}", req.sans().join(", "))
            } else {
                String::new()
            };
            eprintln!(
                "issued {} certificate `{name}`{hosts} for {days} days: {} and {} (0600)",
                role.as_str(),
                pem.display(),
                key.display()
            );
            Ok(())
        }
    }
}

fn ee(cmd: EeCommand) -> Result<()> {
    match cmd {
        EeCommand::Keygen {
            out,
            force,
            spec,
            input_key,
            offset,
            bert_config,
            gguf,
            num_labels,
            profile,
        } => {
            let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
            let spec = spec.as_deref().map(read_spec).transpose()?;
            // BERT classifiers and causal LMs take their profile's groups; the MLP its input key.
            let profiled = match (&spec, bert_config, gguf) {
                (_, _, Some(path)) => Some((
                    fedee_model::Architecture::Llama(load_gguf(&path)?.config),
                    "causal LM",
                )),
                (Some(s), _, _) if s.model.kind == fedee_spec::ModelKind::Bert => Some((
                    fedee_model::Architecture::BertClassifier(
                        fedee_site_agent::task::bert_classifier(s)?,
                    ),
                    "BERT classifier",
                )),
                (_, Some(path), _) => Some((
                    fedee_model::Architecture::BertClassifier(fedee_model::BertClassifierConfig {
                        bert: fedee_model::BertConfig::from_file(&path)?,
                        num_labels,
                    }),
                    "BERT classifier",
                )),
                _ => None,
            };
            let (keys, what) = match profiled {
                Some((arch, name)) => {
                    let keys = KeySet::generate(
                        &arch.key_spec(),
                        &arch.key_groups(profile),
                        false,
                        &mut rng,
                    )?;
                    (keys, format!("{name}, {profile:?} profile"))
                }
                None => {
                    let spec = spec.context("pass --spec, --bert-config or --gguf")?;
                    let cfg = fedee_site_agent::task::mlp_config(&spec)?;
                    let spec = cfg.key_spec();
                    let groups = [("input".to_owned(), input_key)].into_iter().collect();
                    let keys = KeySet::generate(&spec, &groups, offset, &mut rng)?;
                    (
                        keys,
                        format!(
                            "MLP, {input_key} input key{}",
                            if offset { ", offset δ" } else { "" }
                        ),
                    )
                }
            };
            keys.save(&out, force)?;
            eprintln!(
                "wrote {} keys ({what}) to {} (mode 0600)",
                keys.keys.len(),
                out.display()
            );
            Ok(())
        }
        EeCommand::Tokenize {
            keys,
            tokenizer,
            max_len,
            max_tokens_per_key,
            text,
        } => {
            let k = KeySet::load(&keys)?;
            if !k.keys.contains_key("vocab") {
                bail!(
                    "{} has no `vocab` key: generate BERT keys with `fedee ee keygen --bert-config`",
                    keys.display()
                );
            }
            let tok = fedee_model::text::TextTokenizer::from_file(&tokenizer, max_len)?;
            let mut meter = fedee_encrypt::volume::VolumeMeter::open(&keys)?;
            for t in &text {
                let ids = tch::Tensor::from_slice(&tok.ids(t)?);
                let enc = Vec::<i64>::try_from(fedee_encrypt::encrypt_indices(&k, "vocab", &ids)?)?;
                let mask = vec![1; enc.len()];
                let total = meter.add(enc.len() as u64)?;
                if let Some(w) =
                    fedee_encrypt::volume::VolumeMeter::warning(total, max_tokens_per_key)
                {
                    eprintln!("{w}");
                }
                println!(
                    "{}",
                    serde_json::json!({ "input_ids": enc, "attention_mask": mask })
                );
            }
            Ok(())
        }
        EeCommand::Encrypt { files } => transform_file(&files, Direction::Encrypt),
        EeCommand::Decrypt { files } => transform_file(&files, Direction::Decrypt),
        EeCommand::Rotate { files, new_keys } => {
            if new_keys.exists() {
                bail!(
                    "{} exists: choose a new path for the new keys (the old key file stays valid for the old EE model)",
                    new_keys.display()
                );
            }
            transform_file(&files, Direction::Rotate(new_keys))
        }
        EeCommand::Attack(a) => attack::run(a),
    }
}

enum Direction {
    Encrypt,
    Decrypt,
    Rotate(PathBuf),
}

/// The key spec of the model a transform works on: the spec's model, or a BERT classifier
/// of `--bert-config` with the model's number of classes; refused if the key file is for
/// another architecture.
fn spec_for(
    k: &KeySet,
    state: &fedee_encrypt::StateDict,
    files: &TransformFiles,
    gguf: Option<fedee_model::llama::LlamaConfig>,
) -> Result<fedee_encrypt::KeySpec> {
    let arch = match (&files.spec, &files.bert_config) {
        (Some(p), _) => fedee_site_agent::task::architecture(&read_spec(p)?)?,
        // The model file was the GGUF itself: its architecture is already read.
        (None, None) if gguf.is_some() || files.gguf.is_some() => {
            fedee_model::Architecture::Llama(match gguf {
                Some(c) => c,
                None => load_gguf(files.gguf.as_ref().expect("checked"))?.config,
            })
        }
        (None, Some(p)) => {
            let num_labels = state
                .get("classifier.bias")
                .map(|t| t.size()[0] as usize)
                .context("model has no `classifier.bias`: it is not a BERT classifier")?;
            fedee_model::Architecture::BertClassifier(fedee_model::BertClassifierConfig {
                bert: fedee_model::BertConfig::from_file(p)?,
                num_labels,
            })
        }
        (None, None) => bail!("pass --spec (the federation spec), --bert-config or --gguf"),
    };
    if arch.name() != k.architecture {
        bail!(
            "the keys are for a `{}` model, but the spec describes a `{}`: use the key file made for this model",
            k.architecture,
            arch.name()
        );
    }
    Ok(arch.key_spec())
}

fn transform_file(files: &TransformFiles, dir: Direction) -> Result<()> {
    let TransformFiles {
        keys, model, out, ..
    } = files;
    let k = KeySet::load(keys)?;
    let (state, gguf) = if model.extension().is_some_and(|e| e == "gguf") {
        if !matches!(dir, Direction::Encrypt) {
            bail!(
                "{} is a GGUF file: only `fedee ee encrypt` reads GGUF (EE models are safetensors)",
                model.display()
            );
        }
        let m = load_gguf(model)?;
        (m.state, Some(m.config))
    } else {
        let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
        (state_from_safetensors(&bytes, Device::Cpu)?, None)
    };
    let spec = spec_for(&k, &state, files, gguf)?;
    let t = std::time::Instant::now();
    let result = match dir {
        Direction::Encrypt => fedee_encrypt::transform_state(&spec, &k, &state)?,
        Direction::Decrypt => fedee_encrypt::decrypt_state(&spec, &k, &state)?,
        Direction::Rotate(new_path) => {
            let mut rng = rand_chacha::ChaCha20Rng::from_os_rng();
            let (new, ee) = fedee_encrypt::rotate(&spec, &k, &state, &mut rng)?;
            new.save(&new_path, false)?;
            eprintln!(
                "rotated {} keys in {:.2} s: new keys in {} (0600); the old key file only fits the old EE model",
                new.keys.len(),
                t.elapsed().as_secs_f64(),
                new_path.display()
            );
            ee
        }
    };
    std::fs::write(out, state_to_safetensors(&result)?)
        .with_context(|| format!("writing {}", out.display()))?;
    eprintln!("wrote {}", out.display());
    Ok(())
}
