//! fedee's lab: what runs the product end to end and measures it, built only on the library
//! crates' public interfaces (the same calls `fedee site`, `fedee finetune` and `fedee predict`
//! make). The `fedee` binary dispatches `fedee demo`, `fedee bench …` and `fedee ee attack …`
//! here.
//!
//! * [`demo`]: the main job (heart disease federation → EE fine-tuning → encrypted inference)
//!   and `drug_demo`, its text twin on drug reviews.
//! * [`bench`]: benchmarks that print a table and write JSON with units in the keys
//!   (`bench_ee`, `bench_aggregate`, `flamby`); `table` is the one printer of typed rows.
//! * [`heart`], [`drugs`]: the reference data sets as their peers prepare them (FLamby's
//!   Fed-Heart-Disease; the Drugs.com reviews), for the benchmarks, attacks and demos that
//!   compare with published figures. Sites read data through the federation spec instead.
//! * [`attack`]: the attacks an honest-but-curious server runs on EE models, scored with the
//!   key holder's keys.

pub mod attack;
pub mod attack_lm;
pub mod bench;
mod bench_aggregate;
mod bench_dashboard;
mod bench_ee;
mod bench_hss;
mod bench_lm;
mod bench_secagg;
mod consortium;
pub mod demo;
mod drug_demo;
pub mod drugs;
mod flamby;
pub mod heart;
mod table;
