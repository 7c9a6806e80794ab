//! LoRA parity with Python's `peft`: the adapter halo-train wrote (tests/data/lora-stories260k,
//! r = 4 on every projection of ../shared/models/stories260K), loaded by `CausalLm::load` from
//! its adapter directory, gives per-token logits within 1e-4 of `PeftModel` on the same base
//! (one sequence at a time and as a right-padded batch); and an adapter written by `peft`
//! itself (tests/data/lora-peft-stories260k) loads with its logits equal too. Reference:
//! tests/data/lora_stories260k_reference.json, made by ci/parity/make_lora_reference.py.

use std::path::{Path, PathBuf};

use haloflow_ml::model::CausalLm;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data").join(name)
}

/// The stored adapter `name`, copied with `base_model_name_or_path` pointing at the shared base.
fn adapter_dir(tmp: &Path, base: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(data(&format!("{name}/adapter_model.safetensors")), dir.join("adapter_model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_slice(&std::fs::read(data(&format!("{name}/adapter_config.json"))).unwrap()).unwrap();
    config["base_model_name_or_path"] = base.to_str().unwrap().into();
    std::fs::write(dir.join("adapter_config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    dir
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(data("lora_stories260k_reference.json")).unwrap()).unwrap()
}

#[test]
fn adapter_written_by_halo_train_gives_pefts_logits() {
    let Some(base) = haloflow::shared::path("models/stories260K") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = CausalLm::load(&adapter_dir(tmp.path(), &base, "lora-stories260k"), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(model.lora.as_ref().map(|l| (l.config.r, l.config.alpha)), Some((4, 8.0)));
    compare(&model, reference()["cases"].as_array().unwrap());
}

#[test]
fn adapter_written_by_peft_loads_with_pefts_logits() {
    let Some(base) = haloflow::shared::path("models/stories260K") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let model = CausalLm::load(&adapter_dir(tmp.path(), &base, "lora-peft-stories260k"), Device::Cpu, Kind::Float).unwrap();
    let lora = model.lora.as_ref().unwrap();
    assert_eq!((lora.config.r, lora.config.alpha, lora.config.targets.len()), (2, 5.0, 3));
    assert_eq!(model.trainable().len(), 5 * 3 * 2, "A and B of 3 modules in 5 layers");
    compare(&model, reference()["peft_written"]["cases"].as_array().unwrap());
}

/// haloflow's logits for each case's ids against peft's, alone and as a right-padded batch.
fn compare(model: &CausalLm, cases: &[Value]) {
    let ids: Vec<Vec<i64>> = cases.iter().map(|c| serde_json::from_value(c["ids"].clone()).unwrap()).collect();
    let expected: Vec<Tensor> = cases
        .iter()
        .map(|c| {
            let rows: Vec<Vec<f32>> = serde_json::from_value(c["logits"].clone()).unwrap();
            Tensor::from_slice(&rows.concat()).view([rows.len() as i64, -1])
        })
        .collect();
    for (i, (p, e)) in ids.iter().zip(&expected).enumerate() {
        let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0);
        let diff = (got - e).abs().max().double_value(&[]);
        let moved = cases[i]["max_abs_diff_from_base"].as_f64().unwrap();
        eprintln!("case {i}: max |haloflow − peft| logit {diff:.2e} (the adapter moves logits by up to {moved:.3})");
        assert!(moved > 0.1, "the stored adapter must change the model");
        assert!(diff < 1e-4, "case {i}: max abs logit difference {diff}");
    }
    let t = ids.iter().map(Vec::len).max().unwrap();
    let padded: Vec<i64> = ids.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat(0)).take(t)).collect();
    let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(&padded).view([ids.len() as i64, t as i64])));
    for (i, (p, e)) in ids.iter().zip(&expected).enumerate() {
        let diff = (got.get(i as i64).narrow(0, 0, p.len() as i64) - e).abs().max().double_value(&[]);
        eprintln!("padded row {i}: max |haloflow − peft| logit {diff:.2e}");
        assert!(diff < 1e-4, "padded row {i}: max abs logit difference {diff}");
    }
}
