//! halo-train with LoRA on stories260K: it learns the synthetic preference, writes a PEFT
//! adapter directory that loads back onto its base model (and is refused on another one),
//! merged weights equal base + B·A·alpha/r, the live reference is the base model with the
//! adapters off, a killed run resumes exactly, and bad settings are refused before anything is
//! written.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{assert_resume_is_exact, model_dir, refcache, train, write_plan};
use haloflow_ml::model::CausalLm;
use tch::{Device, Kind, Tensor};

const LORA: &str = r#"{"r": 8, "alpha": 16}"#;

fn tensors(path: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap().into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn kto_with_lora_learns_the_preference_on_held_out_prompts() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 12, false);
    let args = ["--loss", "kto", "--lr", "1e-2", "--epochs", "4", "--eval-batches", "2", "--eval-every", "10", "--lora", LORA];
    let (out, run) = train(dir.path(), "kto", &plan, &model, &args, &[]);
    assert!(out.status.success());
    let (before, after) = run.first_and_last("eval/rewards/margins");
    eprintln!("LoRA: held-out desirable − undesirable reward margin: {before:.4} → {after:.4}");
    assert!(after > before + 0.5, "held-out margin did not improve with LoRA: {before} → {after}");
    let policy = run.dir.join("policy");
    assert!(policy.join("adapter_config.json").is_file() && policy.join("tokenizer.json").is_file());
    assert!(!policy.join("model.safetensors").exists(), "an adapter directory holds no full weights");
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(policy.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["task_type"].as_str(), config["r"].as_i64()), (Some("LORA"), Some("CAUSAL_LM"), Some(8)));
    assert_eq!(config["base_model_name_or_path"].as_str().unwrap(), std::fs::canonicalize(&model).unwrap().to_str().unwrap());
    let adapter = tensors(&policy.join("adapter_model.safetensors"));
    // stories260K: 5 layers × 7 projections × (A, B).
    assert_eq!(adapter.len(), 70);
    assert!(adapter.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(run.dir.join("summary.json")).unwrap()).unwrap();
    let trained: i64 = adapter.values().map(|t| t.numel() as i64).sum();
    assert_eq!(summary["trainable_parameters"].as_i64(), Some(trained));
    assert_eq!(summary["memory_estimate"]["trainable"].as_i64(), Some(trained), "the memory estimate counts the adapters as trained");
    assert_eq!(summary["memory_estimate"]["reference_gib"].as_f64(), Some(0.0), "with LoRA the live reference is the policy itself: no second copy");
    assert_eq!(summary["reference"].as_str(), Some("base (adapters off)"));
    // The adapter directory loads as base + adapter and scores like the trained policy did:
    // its logits differ from the base model's.
    let loaded = CausalLm::load(&policy, Device::Cpu, Kind::Float).unwrap();
    let base = CausalLm::load(&model, Device::Cpu, Kind::Float).unwrap();
    let ids = Tensor::from_slice(&[1i64, 403, 407, 259, 100, 283]).unsqueeze(0);
    let (a, b) = (loaded.net.forward(&ids), base.net.forward(&ids));
    assert!(max_diff(&a, &b) > 1e-2, "the adapter changes the logits");
    let off = loaded.without_adapters(|| loaded.net.forward(&ids));
    assert!(max_diff(&off, &b) == 0.0, "adapters off = the base model");
}

#[test]
fn merged_weights_equal_base_plus_scaled_b_a() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let merged_dir = dir.path().join("merged");
    let lora = r#"{"r": 4, "alpha": 12, "targets": ["q_proj", "down_proj"]}"#;
    let args = ["--loss", "kto", "--lr", "1e-2", "--max-steps", "3", "--lora", lora, "--merge-lora", "--merged", merged_dir.to_str().unwrap()];
    let (out, run) = train(dir.path(), "merge", &plan, &model, &args, &[]);
    assert!(out.status.success());
    let base = tensors(&model.join("model.safetensors"));
    let adapter = tensors(&run.dir.join("policy/adapter_model.safetensors"));
    let merged = tensors(&merged_dir.join("model.safetensors"));
    assert_eq!(merged.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>(), "HF layout: the base model's names");
    assert!(merged_dir.join("config.json").is_file() && merged_dir.join("tokenizer.json").is_file());
    let mut adapted = 0;
    for (name, w) in &base {
        let module = name.trim_end_matches(".weight");
        let key = |ab: &str| format!("base_model.model.{module}.lora_{ab}.weight");
        let expected = match (adapter.get(&key("A")), adapter.get(&key("B"))) {
            (Some(a), Some(b)) => {
                adapted += 1;
                assert!(b.abs().max().double_value(&[]) > 0.0, "{name}: B was trained");
                w + b.matmul(a) * (12.0 / 4.0)
            }
            _ => w.shallow_clone(),
        };
        let diff = max_diff(&merged[name], &expected);
        assert!(diff < 1e-6, "{name}: merged differs from W + B·A·alpha/r by {diff}");
    }
    assert_eq!(adapted, 10, "q_proj and down_proj of 5 layers");
    // The merged model and base + adapter give the same logits.
    let ids = Tensor::from_slice(&[1i64, 403, 407, 259, 100, 283, 30, 7]).unsqueeze(0);
    let a = CausalLm::load(&merged_dir, Device::Cpu, Kind::Float).unwrap().net.forward(&ids);
    let b = CausalLm::load(&run.dir.join("policy"), Device::Cpu, Kind::Float).unwrap().net.forward(&ids);
    let diff = max_diff(&a, &b);
    eprintln!("merged vs base + adapter: max logit difference {diff:.2e}");
    assert!(diff < 1e-4, "merged vs base + adapter logits differ by {diff}");
    // refcache reads the adapter directory as base + adapter: its log-probs equal the merged
    // model's, not the base model's.
    let logps = |name: &str, model: &Path| -> Vec<f64> {
        let out = refcache(dir.path(), name, &plan, model, &["--threads", "1"]);
        let table = haloflow::io::read_parquet(&out).unwrap();
        let column = table.batches[0].column_by_name("logp").unwrap().clone();
        column.as_any().downcast_ref::<arrow_array::Float64Array>().unwrap().values().to_vec()
    };
    let (adapter, merged, base) = (logps("adapter", &run.dir.join("policy")), logps("merged", &merged_dir), logps("base", &model));
    let worst = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
    eprintln!("refcache log-probs: adapter vs merged {:.2e}, adapter vs base {:.3}", worst(&adapter, &merged), worst(&adapter, &base));
    assert!(worst(&adapter, &merged) < 1e-3 && worst(&adapter, &base) > 1e-2);
}

#[test]
fn with_lora_the_live_reference_is_the_base_model() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 4, false);
    let ref_logps = refcache(dir.path(), "ref", &plan, &model, &[]);
    let steps = ["--loss", "kto", "--lr", "1e-2", "--max-steps", "3", "--lora", LORA];
    let (a, cached) = train(dir.path(), "cache", &plan, &model, &[&steps[..], &["--ref-logps", ref_logps.to_str().unwrap()]].concat(), &[]);
    let (b, live) = train(dir.path(), "live", &plan, &model, &[&steps[..], &["--reference", "live"]].concat(), &[]);
    assert!(a.status.success() && b.status.success());
    // After the first step the adapters are non-zero: the losses still agree only if the live
    // reference switches them off.
    for step in 0..3 {
        let (x, y) = (cached.metrics()["loss"][step].unwrap(), live.metrics()["loss"][step].unwrap());
        assert!((x - y).abs() < 1e-5, "step {step} loss: cache {x} vs live base {y}");
    }
}

#[test]
fn a_killed_lora_run_resumes_with_identical_metrics() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 6, false);
    // Dropout on: the resumed run must draw the same masks.
    let lora = r#"{"r": 4, "alpha": 8, "dropout": 0.1}"#;
    let args = ["--loss", "kto", "--lr", "5e-3", "--epochs", "2", "--save-every", "1", "--warmup-steps", "2", "--decay", "cosine", "--eval-batches", "1", "--eval-every", "3", "--lora", lora];
    let (reference, run) = assert_resume_is_exact(dir.path(), &plan, &model, &args, || {
        let ckpt = std::fs::read_dir(dir.path().join("resumed/ckpt")).unwrap().flatten().next().unwrap().path();
        assert!(ckpt.join("model/adapter_model.safetensors").is_file() && !ckpt.join("model/model.safetensors").exists(), "checkpoints hold the adapter only");
    });
    let (x, y) = (tensors(&reference.dir.join("policy/adapter_model.safetensors")), tensors(&run.dir.join("policy/adapter_model.safetensors")));
    for (name, t) in &x {
        assert!(max_diff(t, &y[name]) == 0.0, "{name} differs after resuming");
    }
}

#[test]
fn bad_lora_settings_and_foreign_adapters_are_refused() {
    let Some(model) = model_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.arrow");
    write_plan(&plan, 2, false);
    for (name, lora, expected) in [
        ("target", r#"{"r": 4, "alpha": 8, "targets": ["q_proj", "c_attn"]}"#, "`c_attn` matches no module of the model; its modules are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"),
        ("rank", r#"{"r": 0, "alpha": 8}"#, "lora.r = 0 must be at least 1"),
        ("json", r#"{"r": 4}"#, "missing field `alpha`"),
        ("dropout", r#"{"r": 4, "alpha": 8, "dropout": 0.1}"#, "--checkpoint-activations with LoRA dropout 0.1"),
    ] {
        let (out, run) = train(dir.path(), name, &plan, &model, &["--loss", "kto", "--max-steps", "1", "--lora", lora, "--checkpoint-activations=true"], &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(expected), "{name}: {err}");
        assert!(!run.dir.join("policy").exists() && !run.dir.join("summary.json").exists(), "{name}: nothing written");
    }
    let (out, _) = train(dir.path(), "merge", &plan, &model, &["--loss", "kto", "--max-steps", "1", "--merge-lora", "--merged", "m"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--merge-lora needs --lora"));

    // An adapter whose base model changed since training is refused, naming both.
    let (out, run) = train(dir.path(), "ok", &plan, &model, &["--loss", "kto", "--max-steps", "1", "--lora", LORA], &[]);
    assert!(out.status.success());
    let adapter = run.dir.join("policy");
    let (out, _) = train(dir.path(), "twice", &plan, &adapter, &["--loss", "kto", "--max-steps", "1", "--lora", LORA], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("is a LoRA adapter directory"), "{err}");
    let other = dir.path().join("other-base");
    std::fs::create_dir_all(&other).unwrap();
    for entry in std::fs::read_dir(&model).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), other.join(entry.file_name())).unwrap();
        }
    }
    let config_path = adapter.join("adapter_config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["base_model_name_or_path"] = other.to_str().unwrap().into();
    std::fs::write(&config_path, serde_json::to_vec(&config).unwrap()).unwrap();
    assert!(CausalLm::load(&adapter, Device::Cpu, Kind::Float).is_ok(), "an identical copy of the base is accepted");
    let mut weights = tensors(&other.join("model.safetensors"));
    let _ = weights.get_mut("model.norm.weight").unwrap().g_mul_scalar_(2.0);
    let list: Vec<(&str, &Tensor)> = weights.iter().map(|(n, t)| (n.as_str(), t)).collect();
    Tensor::write_safetensors(&list, other.join("model.safetensors")).unwrap();
    let err = format!("{:#}", CausalLm::load(&adapter, Device::Cpu, Kind::Float).err().unwrap());
    assert!(err.contains("adapter_config.json") && err.contains("another base model") && err.contains("other-base"), "{err}");
}
