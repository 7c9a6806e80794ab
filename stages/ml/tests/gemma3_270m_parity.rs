//! A real Gemma 3 checkpoint (gemma-3-270m, dequantized from a Q4_K_M GGUF by transformers)
//! against transformers, float32 on the CPU: token ids of plain and chat-templated prompts,
//! per-token logits (one prompt longer than the 512-token sliding window), summed completion
//! log-probs by the tokenization contract, and greedy generation token for token.
//!
//! Run by ci/check_gemma3_270m.sh, which downloads the model (~240 MB), converts it and writes
//! the reference with ci/parity/gemma3_270m.py, then runs this test with `HALO_GEMMA3_270M` set
//! to that directory (`hf/` the model, `reference.json` and `logits_*.f32` the reference).
//! Without the variable the tests do nothing.

use std::path::PathBuf;

use haloflow::records::Message;
use haloflow_ml::generate::Decoder;
use haloflow_ml::logprobs::{sequence_logps, Batch, Sequence, LOGITS_CHUNK};
use haloflow_ml::model::CausalLm;
use haloflow_ml::prompt_format::PromptFormat;
use haloflow_ml::tokenize::Tokenizer;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

/// Logits within this of transformers' (both f32; the model's logits span about ±30).
const LOGIT_TOLERANCE: f64 = 2e-3;
/// Summed completion log-probs within this of transformers'.
const LOGP_TOLERANCE: f64 = 2e-3;

/// The check's directory and its reference, when `HALO_GEMMA3_270M` is set.
fn reference() -> Option<(PathBuf, Value)> {
    let root = PathBuf::from(std::env::var_os("HALO_GEMMA3_270M")?);
    let path = root.join("reference.json");
    let json = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    Some((root, json))
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array().unwrap().iter().map(|x| x.as_i64().unwrap()).collect()
}

/// A reference prompt as haloflow takes it: its messages (a chat, or the plain text as one
/// message) and the tokenizer in the matching prompt format (the chat template, or plain).
fn prompt_of(root: &std::path::Path, case: &Value) -> (Tokenizer, Vec<Message>) {
    let (format, messages) = match case.get("chat") {
        Some(chat) => (PromptFormat::Template, serde_json::from_value::<Vec<Message>>(chat.clone()).unwrap()),
        None => (PromptFormat::Plain, vec![Message::new("user", case["plain"].as_str().unwrap())]),
    };
    (Tokenizer::from_dir(root.join("hf")).unwrap().with_prompt_format(format).unwrap(), messages)
}

fn model(root: &std::path::Path) -> CausalLm {
    CausalLm::load(&root.join("hf"), Device::Cpu, Kind::Float).unwrap()
}

#[test]
fn token_ids_match_transformers() {
    let Some((root, r)) = reference() else { return };
    for case in r["sequences"].as_array().unwrap() {
        let (tokenizer, messages) = prompt_of(&root, case);
        assert_eq!(tokenizer.encode_prompt(&messages).unwrap(), ids(&case["ids"]), "prompt ids of {case}");
    }
    for case in r["examples"].as_array().unwrap() {
        let (tokenizer, messages) = prompt_of(&root, case);
        let encoded = tokenizer.encode_example(&messages, case["completion"].as_str().unwrap(), 4096, 4096).unwrap();
        assert_eq!(encoded.ids, ids(&case["ids"]), "example ids of {case}");
        assert_eq!(encoded.completion_start as u64, case["completion_start"].as_u64().unwrap());
    }
}

#[test]
fn logits_match_transformers_beyond_the_window() {
    let Some((root, r)) = reference() else { return };
    let model = model(&root);
    let window = r["sliding_window"].as_i64().unwrap();
    assert_eq!(model.net.sliding_window(), Some(window));
    let vocab = r["vocab_size"].as_i64().unwrap();
    let mut longest = 0;
    let mut worst: f64 = 0.0;
    for case in r["sequences"].as_array().unwrap() {
        let prompt = ids(&case["ids"]);
        let from = case["logits_from"].as_i64().unwrap();
        let path = root.join(case["logits_file"].as_str().unwrap());
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let floats: Vec<f32> = bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        let want = Tensor::from_slice(&floats).view([-1, vocab]);
        let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(&prompt).unsqueeze(0))).squeeze_dim(0).narrow(0, from, prompt.len() as i64 - from);
        let diff = (&got - &want).abs().max().double_value(&[]);
        let argmax_equal = got.argmax(-1, false).eq_tensor(&want.argmax(-1, false)).all().int64_value(&[]) == 1;
        eprintln!("gemma-3-270m, {} tokens (positions {from}..): max |Δlogit| {diff:.2e}, argmax equal: {argmax_equal}", prompt.len());
        assert!(diff < LOGIT_TOLERANCE, "{} tokens: max abs logit difference {diff}", prompt.len());
        longest = longest.max(prompt.len() as i64);
        worst = worst.max(diff);
    }
    assert!(longest > window, "a prompt longer than the window ({window})");
    eprintln!("gemma-3-270m: max |Δlogit| over all prompts {worst:.2e}");
}

#[test]
fn completion_logps_match_transformers() {
    let Some((root, r)) = reference() else { return };
    let model = model(&root);
    let examples = r["examples"].as_array().unwrap();
    let seqs: Vec<Sequence> = examples.iter().map(|e| Sequence { ids: ids(&e["ids"]), completion_start: e["completion_start"].as_u64().unwrap() as usize }).collect();
    let (sums, _) = tch::no_grad(|| sequence_logps(&model.net, &Batch::new(&seqs.iter().collect::<Vec<_>>(), 0, Device::Cpu), LOGITS_CHUNK));
    let mut worst: f64 = 0.0;
    for (i, e) in examples.iter().enumerate() {
        let (got, want) = (sums.double_value(&[i as i64]), e["logp"].as_f64().unwrap());
        eprintln!("gemma-3-270m, example {i} ({} tokens): summed completion logp {got:.5} vs transformers {want:.5}", seqs[i].ids.len());
        worst = worst.max((got - want).abs());
    }
    eprintln!("gemma-3-270m: max |Δ summed completion logp| {worst:.2e}");
    assert!(worst < LOGP_TOLERANCE, "summed completion log-probs differ by {worst}");
}

#[test]
fn greedy_generation_matches_transformers() {
    let Some((root, r)) = reference() else { return };
    let model = model(&root);
    let _no_grad = tch::no_grad_guard();
    for case in r["greedy"].as_array().unwrap() {
        let prompt = ids(&case["prompt_ids"]);
        let expected = ids(&case["new_ids"]);
        let (mut decoder, mut logits) = Decoder::prefill(&model.net, &[&prompt], Device::Cpu);
        let mut got = Vec::new();
        while got.len() < expected.len() {
            let token = logits.get(0).argmax(0, false).int64_value(&[]);
            got.push(token);
            logits = decoder.step(&[token]);
        }
        eprintln!("gemma-3-270m, {} prompt tokens: {} greedy tokens, smallest top-2 gap along transformers' path {}", prompt.len(), got.len(), case["min_top2_gap"]);
        assert_eq!(got, expected, "greedy continuation of {} prompt tokens ({:?})", prompt.len(), case["text"]);
    }
}
