use std::time::Instant;
use fedee_hss::client::{HssClient, InProcess, classify, offloaded_state};
use fedee_hss::engine::Engine;
use fedee_hss::server::HssModel;
use fedee_model::{BertClassifierConfig, BertConfig, bert};
use tch::{Device, Kind, Tensor};
fn main() {
    let bert = BertConfig::from_file(std::path::Path::new("data/cache/minilm/config.json")).unwrap();
    let cfg = BertClassifierConfig { bert, num_labels: 3 };
    let state = cfg.init_random(Kind::Float);
    let off = offloaded_state(&cfg, &state);
    let s = [HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap(), HssModel::from_state(&off, Engine::Limbs(Device::Cpu)).unwrap()];
    let mut c = HssClient::new(InProcess::new([&s[0], &s[1]], false), &off).unwrap();
    let ids = Tensor::randint(30000, [1, 128], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([1, 128], (Kind::Int64, Device::Cpu));
    let ck = cfg.check_state(&state).unwrap();
    for _ in 0..3 {
        let t = Instant::now();
        let _ = tch::no_grad(|| classify(&mut c, &cfg, ck, &ids, &mask)).unwrap();
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = tch::no_grad(|| bert::classify(&cfg, ck, &ids, &mask));
        eprintln!("hss in-process {:.1} ms, plain {:.1} ms", a * 1e3, t.elapsed().as_secs_f64() * 1e3);
    }
    // One server's FFN-out GEMM alone.
    let x: Vec<u64> = (0..128 * 1536u64).map(|i| i.wrapping_mul(0x9e3779b97f4a7c15)).collect();
    let req = fedee_hss::server::LinearRequest { maps: vec!["encoder.layer.0.output.dense".into()], rows: 128, cols: 1536, frac_bits: 20, share: fedee_hss::server::Share::Words(x) };
    for _ in 0..3 {
        let t = Instant::now();
        let _ = s[1].linear(&req).unwrap();
        eprintln!("ffn-out share product {:.2} ms", t.elapsed().as_secs_f64() * 1e3);
    }
    let a = Tensor::randn([384, 1536], (Kind::Double, Device::Cpu));
    let w = Tensor::randn([1536, 384], (Kind::Double, Device::Cpu));
    for _ in 0..3 { let t = Instant::now(); let _ = a.matmul(&w); eprintln!("raw f64 gemm {:.2} ms", t.elapsed().as_secs_f64()*1e3); }
}
