//! Random tiny models of a stored transformers reference (window_reference.json,
//! arch_reference.json), rebuilt as halo-init wrote them: shared by the sliding-window,
//! architecture and LoRA parity tests.

use crate::common;
use haloflow_ml::config::Config;
use haloflow_ml::model::CausalLm;
use serde_json::Value;
use tch::{Device, Kind};

/// libtorch's random generator is global: whatever draws from it in a test binary that rebuilds
/// models (random initialisation, LoRA's fresh A) holds this lock, so that no thread draws
/// between another's seed and its weights.
pub fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SEEDED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reference's model rebuilt as halo-init wrote it (seed, then random weights), with
/// `config` changed by `edit`; panics if the weights are not the ones transformers ran.
pub fn rebuild(m: &Value, edit: impl Fn(&mut Value)) -> CausalLm {
    let mut json = m["config"].clone();
    edit(&mut json);
    let config: Config = serde_json::from_value(json).unwrap();
    let model = {
        let _one_at_a_time = rng_lock();
        tch::manual_seed(m["seed"].as_i64().unwrap());
        CausalLm::random(config, &common::stories_dir().unwrap(), Device::Cpu, Kind::Float).unwrap()
    };
    let sum: f64 = model.vs.variables().values().map(|t| t.abs().sum(Kind::Double).double_value(&[])).sum();
    let want = m["weight_abs_sum"].as_f64().unwrap();
    assert!((sum - want).abs() <= 1e-9 * want, "{}: rebuilt weights differ from halo-init's (|w| sum {sum} vs {want})", m["name"]);
    model
}
