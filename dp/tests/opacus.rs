//! fedee's RDP accountant against Opacus's (`fixtures/opacus_rdp.json`, made by
//! `fixtures/make_opacus_rdp.py` with Opacus 1.6.0): every ε within 1 % on the grid
//! q ∈ {0.001 … 1}, σ ∈ {0.5 … 4}, steps ∈ {1 … 10 000}, δ ∈ {1e-4, 1e-5, 1e-6}.

use fedee_dp::rdp::{RdpAccountant, default_orders};

#[test]
fn epsilon_matches_opacus_within_one_percent() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/opacus_rdp.json");
    let fixture: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let orders: Vec<f64> = fixture["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(
        orders,
        default_orders(),
        "the fixture uses Opacus's default orders"
    );
    let rows = fixture["rows"].as_array().unwrap();
    assert!(rows.len() >= 600);
    let (mut worst, mut worst_row) = (0.0f64, String::new());
    for r in rows {
        let (q, sigma, steps, delta, want) = (
            r["q"].as_f64().unwrap(),
            r["sigma"].as_f64().unwrap(),
            r["steps"].as_u64().unwrap(),
            r["delta"].as_f64().unwrap(),
            r["epsilon"].as_f64().unwrap(),
        );
        let mut acc = RdpAccountant::default();
        acc.add(q, sigma, steps).unwrap();
        let (got, _) = acc.epsilon(delta);
        let rel = (got - want).abs() / want.abs().max(1e-12);
        if rel > worst {
            worst = rel;
            worst_row =
                format!("q={q} σ={sigma} steps={steps} δ={delta}: fedee {got}, Opacus {want}");
        }
        assert!(
            rel <= 0.01,
            "q={q} σ={sigma} steps={steps} δ={delta}: fedee ε = {got}, Opacus ε = {want} ({:.3} %)",
            rel * 100.0
        );
    }
    println!(
        "RDP accountant vs Opacus {}: {} grid points, worst relative difference {:.2e} ({worst_row})",
        fixture["opacus_version"],
        rows.len(),
        worst
    );
}
