//! halo-init writes a loadable Hugging Face directory; saving and reloading keeps the logits.

use std::path::PathBuf;
use std::process::Command;

use haloflow_ml::model::CausalLm;
use tch::{Device, Kind, Tensor};

fn tokenizer_dir() -> Option<PathBuf> {
    haloflow::shared::path("models/stories260K")
}

#[test]
fn init_then_load_then_save_round_trips() {
    let Some(tok) = tokenizer_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny");
    for arch in ["llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3"] {
        let status = Command::new(env!("CARGO_BIN_EXE_halo-init"))
            .args(["--arch", arch, "--hidden", "32", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--seed", "3"])
            .args(["--tokenizer", tok.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .status()
            .unwrap();
        assert!(status.success());
        for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let model = CausalLm::load(&out, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(model.config.vocab_size, 512);
        let ids = Tensor::from_slice(&[1i64, 403, 407, 261, 378]).unsqueeze(0);
        let logits = tch::no_grad(|| model.net.forward(&ids));
        let again = dir.path().join("again");
        model.save(&again).unwrap();
        let reloaded = CausalLm::load(&again, Device::Cpu, Kind::Float).unwrap();
        let diff = (tch::no_grad(|| reloaded.net.forward(&ids)) - logits).abs().max().double_value(&[]);
        assert_eq!(diff, 0.0, "{arch}: save/load changed the logits");
    }
}

#[test]
fn sliding_windows_are_written_as_transformers_reads_them_and_refused_for_llama() {
    let Some(tok) = tokenizer_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("w");
    let init = |arch: &str| {
        Command::new(env!("CARGO_BIN_EXE_halo-init"))
            .args(["--arch", arch, "--hidden", "32", "--layers", "3", "--sliding-window", "4", "--max-window-layers", "1"])
            .args(["--tokenizer", tok.to_str().unwrap(), "--out", out.to_str().unwrap()])
            .output()
            .unwrap()
    };
    let (all, second_on, alternating) = (vec![true, true, true], vec![false, true, true], vec![true, false, true]);
    for (arch, layers) in [("mistral", all.clone()), ("qwen2", second_on.clone()), ("qwen3", second_on), ("gemma2", alternating), ("gemma3", all)] {
        assert!(init(arch).status.success());
        let model = CausalLm::load(&out, Device::Cpu, Kind::Float).unwrap();
        assert_eq!(model.config.sliding_window_layers().unwrap(), (Some(4), layers), "{arch}");
    }
    let refused = init("llama");
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("--sliding-window needs"));
}

#[test]
fn bad_checkpoints_are_refused_naming_file_and_tensor() {
    let Some(tok) = tokenizer_dir() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    assert!(Command::new(env!("CARGO_BIN_EXE_halo-init"))
        .args(["--hidden", "32", "--tokenizer", tok.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .status()
        .unwrap()
        .success());
    // Shape mismatch between config and weights names the tensor.
    let config_path = out.join("config.json");
    let original = std::fs::read_to_string(&config_path).unwrap();
    std::fs::write(&config_path, original.replace("\"intermediate_size\": 88", "\"intermediate_size\": 96")).unwrap();
    let err = format!("{:#}", CausalLm::load(&out, Device::Cpu, Kind::Float).err().unwrap());
    assert!(err.contains("mlp") && err.contains("shape"), "{err}");
    std::fs::write(&config_path, &original).unwrap();
    // A truncated weights file names the file.
    let weights = out.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let err = format!("{:#}", CausalLm::load(&out, Device::Cpu, Kind::Float).err().unwrap());
    assert!(err.contains("model.safetensors") && err.contains("corrupt or truncated"), "{err}");
    // A missing weights file is named too.
    std::fs::remove_file(&weights).unwrap();
    let err = format!("{:#}", CausalLm::load(&out, Device::Cpu, Kind::Float).err().unwrap());
    assert!(err.contains("no model.safetensors"), "{err}");
}
