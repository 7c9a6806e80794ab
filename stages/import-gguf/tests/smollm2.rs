//! The embedded default model, SmolLM2-135M-Instruct (Q4_1 GGUF, fetched by
//! ci/fetch-smollm2.sh): the tokenizer rebuilt by halo-import-gguf reproduces llama.cpp's token
//! ids on a varied text set (tests/data/smollm2_tokenization.json, made by
//! ci/parity/make_smollm2_tokenization.py), where transformers' own GGUF conversion does not;
//! and the directory has the expected config, weights and tokenizer config. The logits and the
//! greedy chat answer are checked by stages/ml/tests/smollm2_parity.rs.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{read_json, run_import};
use serde_json::Value;

const GGUF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");

/// The GGUF file imported once per run into a temporary directory; `None` (after printing
/// `SKIPPED: ...`) when the file is missing, unless `HALO_REQUIRE_SMOLLM2=1`.
fn imported() -> Option<&'static Path> {
    static DIR: OnceLock<Option<(tempfile::TempDir, PathBuf, f64)>> = OnceLock::new();
    let entry = DIR.get_or_init(|| {
        if !Path::new(GGUF).is_file() {
            if std::env::var("HALO_REQUIRE_SMOLLM2").as_deref() == Ok("1") {
                panic!("{GGUF} is missing and HALO_REQUIRE_SMOLLM2=1 (run ci/fetch-smollm2.sh)");
            }
            println!("SKIPPED: {GGUF} missing (run ci/fetch-smollm2.sh)");
            return None;
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("smollm2");
        let started = std::time::Instant::now();
        let run = run_import(Path::new(GGUF), &out);
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        Some((tmp, out, started.elapsed().as_secs_f64()))
    });
    entry.as_ref().map(|(_, out, seconds)| {
        eprintln!("imported in {seconds:.1}s");
        out.as_path()
    })
}

#[test]
fn tokenizer_reproduces_llama_cpp_token_ids() {
    let Some(dir) = imported() else { return };
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/smollm2_tokenization.json");
    let expected: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 25);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), ids, "token ids of {text:?}");
        assert_eq!(tok.decode(&ids, false).unwrap(), text, "decoding the ids of {text:?}");
    }
    // transformers' converter leaves the digit split out: ":\n\n4" gives ":" "\n" "\n" "4" there,
    // ":" "\n\n" "4" in llama.cpp and here.
    let case = cases.iter().find(|c| c["text"] == ":\n\n4").unwrap();
    assert_eq!(case["ids"], serde_json::json!([42, 1116, 36]));
    assert_eq!(case["transformers_gguf_ids"], serde_json::json!([42, 198, 198, 36]));
    assert_eq!(tok.encode(":\n\n4", true).unwrap().get_tokens(), [":", "ĊĊ", "4"]);
}

#[test]
fn writes_config_weights_and_tokenizer_config() {
    let Some(dir) = imported() else { return };
    let config = read_json(dir, "config.json");
    let expected = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    });
    for (key, value) in expected.as_object().unwrap() {
        assert_eq!(&config[key], value, "config.json {key}");
    }

    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let header = header.as_object().unwrap();
    assert_eq!(header.len(), 272 + 1, "272 tensors and __metadata__");
    assert!(!header.contains_key("lm_head.weight"), "tied embeddings: no lm_head");
    assert_eq!(header["model.embed_tokens.weight"]["shape"], serde_json::json!([49152, 576]));
    assert_eq!(header["model.layers.29.self_attn.k_proj.weight"]["shape"], serde_json::json!([192, 576]));
    assert!(header.iter().filter(|(k, _)| *k != "__metadata__").all(|(_, v)| v["dtype"] == "F32"));

    let tc = read_json(dir, "tokenizer_config.json");
    assert_eq!(tc["add_bos_token"], false);
    assert_eq!(
        (tc["bos_token"].as_str(), tc["eos_token"].as_str(), tc["pad_token"].as_str()),
        (Some("<|im_start|>"), Some("<|im_end|>"), Some("<|im_end|>"))
    );
    assert_eq!(tc["unk_token"], "<|endoftext|>");
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"), "the chat template of the GGUF file");
    assert_eq!(tc["added_tokens_decoder"].as_object().unwrap().len(), 17, "the 17 control tokens");
}
