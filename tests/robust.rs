//! Poisoning: four hospitals train the heart-disease MLP; one sends its honest update scaled
//! ×100 every round. FedAvg's accuracy collapses; the coordinate-wise median and trimmed mean
//! hold (Yin et al. 2018). Real local training (site agent's task), real aggregation
//! strategies (aggregator), evaluated on the honest hospitals' test splits.

use fedee_aggregator::strategy::{Strategy, aggregate};
use fedee_aggregator::tensors::Tensors;
use fedee_encrypt::StateDict;
use fedee_lab::heart::{Examples, NUM_FEATURES, load_standardized};
use fedee_model::{
    Activation, Mlp, MlpConfig, OptimizerSpec, state_from_safetensors, state_to_safetensors,
};
use fedee_site_agent::task::{HeldOut, LocalTask, RoundSettings, TabularTask};
use rand::SeedableRng;
use tch::{Device, Kind};

const HOSPITALS: [&str; 4] = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"];
const POISONER: usize = 3;
const ROUNDS: usize = 15;

fn to_tensors(s: &StateDict) -> Tensors {
    Tensors::from_safetensors(&state_to_safetensors(s).unwrap()).unwrap()
}

fn to_state(t: &Tensors) -> StateDict {
    state_from_safetensors(&t.to_safetensors(), Device::Cpu).unwrap()
}

/// Mean test accuracy over the honest hospitals (weighted by test size) after `ROUNDS`.
fn run(strategy: Strategy, poison: bool) -> f64 {
    let csv = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("data/cache/heart_disease_uci.csv");
    assert!(csv.exists(), "{} missing: run `make data`", csv.display());
    let cfg = MlpConfig {
        in_features: NUM_FEATURES,
        hidden: vec![8],
        out_features: 2,
        activation: Activation::Relu,
    };
    let mut tasks: Vec<TabularTask> = HOSPITALS
        .iter()
        .map(|h| {
            let p = load_standardized(&csv, h).unwrap();
            let sgd = OptimizerSpec::Sgd {
                lr: 0.0,
                momentum: 0.9,
                weight_decay: 0.0,
            };
            TabularTask::new(
                &p.train,
                &Examples::default(),
                &p.test,
                cfg.clone(),
                sgd,
                Device::Cpu,
            )
        })
        .collect();
    tch::manual_seed(0);
    let mut global = to_tensors(&Mlp::new(cfg, Device::Cpu, Kind::Float).unwrap().state());
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let settings = RoundSettings {
        epochs: 2,
        batch_size: 16,
        learning_rate: 0.05,
        proximal_mu: 0.0,
    };
    for _ in 0..ROUNDS {
        let g = to_state(&global);
        let mut updates = vec![];
        for (i, t) in tasks.iter_mut().enumerate() {
            let (local, _) = t.train(&g, &settings, &mut rng).unwrap();
            let mut u = to_tensors(&local);
            for (d, gd) in u.data.iter_mut().zip(&global.data) {
                for (x, y) in d.iter_mut().zip(gd) {
                    *x -= y;
                    if poison && i == POISONER {
                        *x *= 100.0;
                    }
                }
            }
            updates.push((t.num_examples(), u));
        }
        let pairs: Vec<(u64, &Tensors)> = updates.iter().map(|(n, u)| (*n, u)).collect();
        global = aggregate(strategy, &global, &pairs, None).0;
    }
    let g = to_state(&global);
    let (mut correct, mut total) = (0.0, 0.0);
    for (i, t) in tasks.iter_mut().enumerate() {
        if i == POISONER {
            continue;
        }
        let n = t.num_held_out(HeldOut::Test) as f64;
        correct += t.evaluate(&g, HeldOut::Test).unwrap().accuracy * n;
        total += n;
    }
    correct / total
}

#[test]
fn robust_rules_hold_under_a_scaled_update_while_fedavg_collapses() {
    let clean = run(Strategy::FedAvg, false);
    let rows = [
        ("FedAvg", Strategy::FedAvg),
        ("median", Strategy::Median),
        ("trimmed mean (β = 0.25)", Strategy::TrimmedMean(0.25)),
    ];
    println!("no poisoning, FedAvg: accuracy {clean:.3}");
    let mut poisoned = vec![];
    for (name, s) in rows {
        let acc = run(s, true);
        println!("one site ×100, {name}: accuracy {acc:.3}");
        poisoned.push(acc);
    }
    assert!(clean > 0.7, "clean FedAvg should learn: {clean}");
    assert!(
        poisoned[0] < clean - 0.1,
        "FedAvg should collapse under a ×100 update: {} vs clean {clean}",
        poisoned[0]
    );
    for (acc, (name, _)) in poisoned[1..].iter().zip(&rows[1..]) {
        assert!(
            *acc > clean - 0.05,
            "{name} should hold: {acc} vs clean FedAvg {clean}"
        );
    }
}
