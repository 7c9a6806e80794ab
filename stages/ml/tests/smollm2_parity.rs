//! The embedded default model end to end: SmolLM2-135M-Instruct's GGUF file (fetched by
//! ci/fetch-smollm2.sh) imported by `halo-import-gguf` and loaded here reproduces transformers
//! loading the same GGUF file: the full-vocabulary logits of the last position of three
//! sequences within 2e-4 and the argmax at every position, and transformers' greedy answer to a
//! chat question (which names Paris), prompt ids included. Reference data:
//! stages/import-gguf/tests/data/smollm2_reference.json and smollm2_last_logits.f32, made by
//! ci/parity/make_smollm2_reference.py.
//!
//! Needs the release build of halo-import-gguf (`cargo build --release -p halo-import-gguf`; the
//! bootstrap builds every binary).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use haloflow::records::Message;
use haloflow_ml::generate::{GenerateOptions, Generator, PromptIds};
use haloflow_ml::model::CausalLm;
use haloflow_ml::tokenize::Tokenizer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

const GGUF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../.cache/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../import-gguf/tests/data");

/// Tests in this file; the last one to finish removes the imported directory.
const TESTS: usize = 2;
static UNFINISHED: AtomicUsize = AtomicUsize::new(TESTS);
static IMPORTED: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Holds the imported directory while a test uses it.
struct Imported(PathBuf);

impl Drop for Imported {
    fn drop(&mut self) {
        if UNFINISHED.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ = std::fs::remove_dir_all(self.0.parent().expect("a parent"));
        }
    }
}

/// The GGUF file imported by halo-import-gguf into a temporary directory (once per run);
/// `None` (after printing `SKIPPED: ...`) when the file is missing, unless
/// `HALO_REQUIRE_SMOLLM2=1`.
fn imported() -> Option<Imported> {
    let dir = IMPORTED.get_or_init(|| {
        if !Path::new(GGUF).is_file() {
            if std::env::var("HALO_REQUIRE_SMOLLM2").as_deref() == Ok("1") {
                panic!("{GGUF} is missing and HALO_REQUIRE_SMOLLM2=1 (run ci/fetch-smollm2.sh)");
            }
            println!("SKIPPED: {GGUF} missing (run ci/fetch-smollm2.sh)");
            return None;
        }
        let bin = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/release/halo-import-gguf");
        assert!(bin.is_file(), "{} is not built: run `cargo build --release -p halo-import-gguf` first", bin.display());
        let out = std::env::temp_dir().join(format!("halo-smollm2-parity-{}", std::process::id())).join("model");
        let started = std::time::Instant::now();
        let status =
            std::process::Command::new(&bin).arg("--gguf").arg(GGUF).arg("--model").arg(&out).status().unwrap();
        assert!(status.success(), "halo-import-gguf failed: {status}");
        eprintln!("imported {GGUF} in {:.1}s", started.elapsed().as_secs_f64());
        Some(out)
    });
    dir.clone().map(Imported)
}

fn reference() -> Value {
    serde_json::from_slice(&std::fs::read(format!("{DATA}/smollm2_reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

#[test]
fn logits_match_transformers_loading_the_gguf() {
    let Some(dir) = imported() else { return };
    let model = CausalLm::load(&dir.0, Device::Cpu, Kind::Float).unwrap();
    let r = reference();
    let vocab = r["vocab_size"].as_u64().unwrap() as i64;
    let bytes = std::fs::read(format!("{DATA}/smollm2_last_logits.f32")).unwrap();
    let last: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
    let sequences = r["sequences"].as_array().unwrap();
    assert_eq!(last.len() as i64, sequences.len() as i64 * vocab);
    for (i, seq) in sequences.iter().enumerate() {
        let tokens = ids(&seq["ids"]);
        let text = seq["text"].as_str().unwrap();
        let logits = tch::no_grad(|| model.net.forward(&Tensor::from_slice(&tokens).unsqueeze(0))).squeeze_dim(0);
        let argmax: Vec<i64> = Vec::try_from(logits.argmax(-1, false)).unwrap();
        assert_eq!(argmax, ids(&seq["argmax"]), "argmax at every position of {text:?}");
        let expected = Tensor::from_slice(&last[i * vocab as usize..(i + 1) * vocab as usize]);
        let diff = (logits.get(tokens.len() as i64 - 1) - expected).abs().max().double_value(&[]);
        eprintln!(
            "sequence {i} ({} tokens): max abs difference of the last position's logits {diff:.2e}",
            tokens.len()
        );
        assert!(diff < 2e-4, "sequence {i}: max abs logit difference {diff}");
    }
}

#[test]
fn answers_a_chat_question_greedily_like_transformers() {
    let Some(dir) = imported() else { return };
    let model = CausalLm::load(&dir.0, Device::Cpu, Kind::Float).unwrap();
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let greedy = &reference()["greedy"];
    let prompt = tok.encode_prompt(&[Message::new("user", greedy["question"].as_str().unwrap())]).unwrap();
    assert_eq!(prompt, ids(&greedy["prompt_ids"]), "the chat template and tokenizer give transformers' prompt ids");
    let options = GenerateOptions {
        max_new_tokens: 30,
        temperature: 0.0,
        top_p: 1.0,
        n: 1,
        seed: 0,
        stop: vec![],
        batch_size: 1,
    };
    let generation =
        Generator::new(&model, &tok).generate(&[PromptIds { key: "q".into(), ids: prompt }], &options, |_| {}).unwrap();
    let sample = &generation.samples[0];
    eprintln!("greedy answer: {:?}", sample.text);
    assert!(sample.text.contains("Paris"), "{:?}", sample.text);
    assert_eq!(sample.token_ids, ids(&greedy["ids"]), "transformers' greedy tokens");
    assert_eq!(sample.text, greedy["text"].as_str().unwrap());
}

/// The end of a ChatML reply, decided once for refcache, train and sample: a completion ends
/// with `<|im_end|>` (the tokenizer's EOS, appended by the tokenization contract) and nothing
/// after it, and generation stops at that same id. TRL's conversational tokenization also keeps
/// the template's newline after `<|im_end|>`; a model never generates that newline (it stops
/// first), so haloflow does not train on it.
#[test]
fn a_chatml_reply_ends_with_im_end_and_generation_stops_there() {
    let Some(dir) = imported() else { return };
    let tok = Tokenizer::from_dir(&dir.0).unwrap();
    let raw = tokenizers::Tokenizer::from_file(dir.0.join("tokenizer.json")).unwrap();
    let im_end = i64::from(raw.token_to_id("<|im_end|>").expect("SmolLM2 has <|im_end|>"));
    let encoded = tok.encode_example(&[Message::new("user", "What is the capital of France?")], "Paris.", 256, 512).unwrap();
    assert_eq!(encoded.ids.last(), Some(&im_end), "the completion ends with <|im_end|>");
    let completion = tok.decode(&encoded.ids[encoded.completion_start..]).unwrap();
    assert_eq!(completion, "Paris.", "no newline or other token after the reply");
    assert_eq!(tok.eos_id(), im_end);
    assert_eq!(tok.stop_ids()[0], im_end, "sampling stops at the token training ends with");
}
