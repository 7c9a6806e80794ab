//! LoRA parity with Python's `peft`: the adapter halo-train wrote (tests/data/lora-stories260k,
//! r = 4 on every projection of ../shared/models/stories260K), loaded by `CausalLm::load` from
//! its adapter directory, gives per-token logits within 1e-4 of `PeftModel` on the same base
//! (one sequence at a time and as a right-padded batch); and an adapter written by `peft`
//! itself (tests/data/lora-peft-stories260k) loads with its logits equal too. Reference:
//! tests/data/lora_stories260k_reference.json, made by ci/parity/make_lora_reference.py.
//!
//! The same for the random tiny Qwen3, Gemma 2 and Gemma 3 models of arch parity (rebuilt from
//! arch_reference.json's config and seed, saved as the adapters' base), on prompts longer than
//! twice the sliding window: the adapters halo-train wrote (tests/data/lora-arch/NAME, r = 4,
//! alpha = 8 on every projection) and those peft wrote (tests/data/lora-arch/peft-NAME, r = 2,
//! alpha = 5 on q_proj, v_proj and down_proj). Reference: tests/data/lora_arch_reference.json,
//! made by ci/parity/make_lora_arch_reference.py.

mod common;
mod tiny;

use std::path::{Path, PathBuf};

use common::{ids, logits_of};
use haloflow_ml::model::CausalLm;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// The stored adapter `name` (a directory under tests/data), copied under `tmp` with
/// `base_model_name_or_path` pointing at `base`.
fn adapter_dir(tmp: &Path, base: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(common::data(&format!("{name}/adapter_model.safetensors")), dir.join("adapter_model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(common::data(&format!("{name}/adapter_config.json"))).unwrap()).unwrap();
    config["base_model_name_or_path"] = base.to_str().unwrap().into();
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    dir
}

/// `CausalLm::load` of `dir` on the CPU in f32, holding the RNG lock: it draws random weights
/// (and A) before loading the stored ones, which must not fall between a rebuild's seed and
/// its weights.
fn load(dir: &Path) -> CausalLm {
    let _rng = tiny::rng_lock();
    CausalLm::load(dir, Device::Cpu, Kind::Float).unwrap()
}

fn reference() -> Value {
    common::reference("lora_stories260k_reference.json")
}

#[test]
fn adapter_written_by_halo_train_gives_pefts_logits() {
    let Some(base) = common::stories_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = load(&adapter_dir(tmp.path(), &base, "lora-stories260k"));
    assert_eq!(model.lora.as_ref().map(|l| (l.config.r, l.config.alpha)), Some((4, 8.0)));
    compare("stories260K", &model, reference()["cases"].as_array().unwrap());
}

#[test]
fn adapter_written_by_peft_loads_with_pefts_logits() {
    let Some(base) = common::stories_dir() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = load(&adapter_dir(tmp.path(), &base, "lora-peft-stories260k"));
    let lora = model.lora.as_ref().unwrap();
    assert_eq!((lora.config.r, lora.config.alpha, lora.config.targets.len()), (2, 5.0, 3));
    assert_eq!(model.trainable().len(), 5 * 3 * 2, "A and B of 3 modules in 5 layers");
    compare("stories260K", &model, reference()["peft_written"]["cases"].as_array().unwrap());
}

#[test]
fn qwen3_and_gemma_adapters_written_by_halo_train_give_pefts_logits() {
    on_arch_models("halo_written", |name, lora| {
        assert_eq!((lora.r, lora.alpha, lora.targets.len()), (4, 8.0, 7), "{name}: r, alpha and targets of halo-train's adapter");
    });
}

#[test]
fn qwen3_and_gemma_adapters_written_by_peft_load_with_pefts_logits() {
    on_arch_models("peft_written", |name, lora| {
        let mut targets = lora.targets.clone();
        targets.sort();
        assert_eq!((lora.r, lora.alpha, targets), (2, 5.0, vec!["down_proj".to_string(), "q_proj".into(), "v_proj".into()]), "{name}: peft's adapter");
    });
}

/// For each model of lora_arch_reference.json (Qwen3, Gemma 2, Gemma 3): its base rebuilt from
/// arch parity's config and seed and saved to a temporary directory, the stored adapter under
/// `key` loaded on it by `CausalLm::load` (which checks the fingerprint halo-train recorded of its
/// base), its settings checked by `check`, its logits compared with peft's.
fn on_arch_models(key: &str, check: impl Fn(&str, &haloflow_ml::lora::LoraConfig)) {
    if common::stories_dir().is_none() {
        return;
    }
    let arch = common::reference("arch_reference.json");
    let reference = common::reference("lora_arch_reference.json");
    let models = reference["models"].as_array().unwrap();
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["qwen3", "gemma2", "gemma3"]);
    let tmp = tempfile::tempdir().unwrap();
    for m in models {
        let name = m["name"].as_str().unwrap();
        let spec = arch["models"].as_array().unwrap().iter().find(|a| a["name"] == m["name"]).unwrap();
        let (want, made_on) = (spec["weight_abs_sum"].as_f64().unwrap(), m["weight_abs_sum"].as_f64().unwrap());
        assert!((want - made_on).abs() <= 1e-9 * want, "{name}: the LoRA reference was made on other weights than arch parity's");
        let base = tmp.path().join(format!("arch-{name}"));
        let rebuilt = tiny::rebuild(spec, |_| {});
        let window = rebuilt.net.sliding_window().expect("a sliding window") as usize;
        rebuilt.save(&base).unwrap();
        let adapter = &m[key];
        let model = load(&adapter_dir(tmp.path(), &base, adapter["adapter"].as_str().unwrap()));
        check(name, &model.lora.as_ref().unwrap().config);
        let modules = adapter["adapted_modules"].as_u64().unwrap() as usize;
        assert_eq!(model.trainable().len(), 2 * modules, "{name}: A and B of the {modules} modules peft adapted");
        let cases = adapter["cases"].as_array().unwrap();
        assert!(cases.iter().any(|c| ids(&c["ids"]).len() > 2 * window), "{name}: a sequence longer than twice the window ({window})");
        compare(&format!("{name}, {key}"), &model, cases);
    }
}

/// haloflow's logits for each case's ids against peft's, alone and as a right-padded batch
/// (`label` names the model in messages).
fn compare(label: &str, model: &CausalLm, cases: &[Value]) {
    let ids: Vec<Vec<i64>> = cases.iter().map(|c| ids(&c["ids"])).collect();
    let expected: Vec<Tensor> = cases.iter().map(|c| logits_of(&c["logits"])).collect();
    for (i, (p, e)) in ids.iter().zip(&expected).enumerate() {
        let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0);
        let diff = (got - e).abs().max().double_value(&[]);
        let moved = cases[i]["max_abs_diff_from_base"].as_f64().unwrap();
        eprintln!("{label}, case {i} ({} tokens): max |haloflow − peft| logit {diff:.2e} (the adapter moves logits by up to {moved:.3})", p.len());
        assert!(moved > 0.1, "{label}: the stored adapter must change the model");
        assert!(diff < 1e-4, "{label}, case {i}: max abs logit difference {diff}");
    }
    let t = ids.iter().map(Vec::len).max().unwrap();
    let padded: Vec<i64> = ids.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat(0)).take(t)).collect();
    let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(&padded).view([ids.len() as i64, t as i64])));
    for (i, (p, e)) in ids.iter().zip(&expected).enumerate() {
        let diff = (got.get(i as i64).narrow(0, 0, p.len() as i64) - e).abs().max().double_value(&[]);
        eprintln!("{label}, padded row {i}: max |haloflow − peft| logit {diff:.2e}");
        assert!(diff < 1e-4, "{label}, padded row {i}: max abs logit difference {diff}");
    }
}
