//! The sliding-window parity checks against a stored transformers reference (made by
//! ci/parity/make_window_reference.py or make_arch_reference.py), shared by window_parity.rs
//! and arch_parity.rs: each reference holds random tiny models written by halo-init, rebuilt
//! from the stored config and seed by `tiny::rebuild`.

use crate::common::{self, ids, logits_of};
use crate::tiny::rebuild;
use haloflow_ml::generate::Decoder;
use haloflow_ml::logprobs::{sequence_logps, shared_prefix_logps, Batch, Sequence};
use serde_json::Value;
use tch::{Device, Tensor};

fn models(reference: &str) -> Vec<Value> {
    common::reference(reference)["models"].as_array().unwrap().clone()
}

/// The config edit that turns every layer's attention global: all `layer_types` full (Gemma,
/// whose configs need a window), else no window.
fn without_window(c: &mut Value) {
    match c.get("layer_types").and_then(|t| t.as_array()).map(|t| t.len()) {
        Some(n) => c["layer_types"] = serde_json::json!(vec!["full_attention"; n]),
        None => c["sliding_window"] = Value::Null,
    }
}

/// Per-token logits within 2e-4 of transformers' (single prompts and a right-padded batch),
/// for prompts longer than twice the window; the window (and soft-capping, where the reference
/// has it) must matter.
pub fn logits_match_transformers_beyond_the_window(reference: &str) {
    if common::stories_dir().is_none() {
        return;
    }
    for m in models(reference) {
        let name = m["name"].as_str().unwrap();
        let model = rebuild(&m, |_| {});
        let window = model.net.sliding_window().expect("a sliding window") as usize;
        let cases = m["logits"].as_array().unwrap();
        let prompts: Vec<Vec<i64>> = cases.iter().map(|c| ids(&c["ids"])).collect();
        let expected: Vec<Tensor> = cases.iter().map(|c| logits_of(&c["logits"])).collect();
        assert!(prompts.iter().any(|p| p.len() > 2 * window), "{name}: a prompt longer than twice the window");
        // The window matters: full attention is far from the reference, in transformers and here.
        let gap = m["full_attention_max_logit_difference"].as_f64().unwrap();
        assert!(gap > 1e-2, "{name}: full attention differs by only {gap}; the test would prove nothing");
        let full = rebuild(&m, without_window);
        let full_gap = prompts.iter().zip(&expected).map(|(p, e)| (tch::no_grad(|| full.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0) - e).abs().max().double_value(&[])).fold(0.0, f64::max);
        assert!(full_gap > 1e-2, "{name}: haloflow without the window matches too ({full_gap})");
        if let Some(gap) = m.get("softcap_max_logit_difference").and_then(|g| g.as_f64()) {
            assert!(gap > 1e-2, "{name}: soft-capping moves the logits by only {gap}; the test would prove nothing");
            let uncapped = rebuild(&m, |c| {
                c["attn_logit_softcapping"] = Value::Null;
                c["final_logit_softcapping"] = Value::Null;
            });
            let p = &prompts[0];
            let ungap = (tch::no_grad(|| uncapped.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0) - &expected[0]).abs().max().double_value(&[]);
            assert!(ungap > 1e-2, "{name}: haloflow without soft-capping matches too ({ungap})");
        }
        for (p, e) in prompts.iter().zip(&expected) {
            let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(p).unsqueeze(0))).squeeze_dim(0);
            let diff = (got - e).abs().max().double_value(&[]);
            eprintln!("{name}, {} tokens (window {window}): max abs logit difference {diff:.2e} (full attention: {full_gap:.2e})", p.len());
            assert!(diff < 2e-4, "{name}: max abs logit difference {diff}");
        }
        let t = prompts.iter().map(|p| p.len()).max().unwrap();
        let padded: Vec<i64> = prompts.iter().flat_map(|p| p.iter().copied().chain(std::iter::repeat(0)).take(t)).collect();
        let got = tch::no_grad(|| model.net.forward(&Tensor::from_slice(&padded).view([prompts.len() as i64, t as i64])));
        for (i, (p, e)) in prompts.iter().zip(&expected).enumerate() {
            let diff = (got.get(i as i64).narrow(0, 0, p.len() as i64) - e).abs().max().double_value(&[]);
            assert!(diff < 2e-4, "{name}, padded row {i}: max abs logit difference {diff}");
        }
    }
}

/// Summed completion log-probs within 1e-3 of transformers', plain and shared-prefix.
pub fn completion_logps_match_transformers_plain_and_shared_prefix(reference: &str) {
    if common::stories_dir().is_none() {
        return;
    }
    for m in models(reference) {
        let name = m["name"].as_str().unwrap();
        let model = rebuild(&m, |_| {});
        let examples = m["examples"].as_array().unwrap();
        let seqs: Vec<Sequence> = examples.iter().map(|e| Sequence { ids: ids(&e["ids"]), completion_start: e["completion_start"].as_u64().unwrap() as usize }).collect();
        let (sums, _) = tch::no_grad(|| sequence_logps(&model.net, &Batch::new(&seqs.iter().collect::<Vec<_>>(), 0, Device::Cpu), haloflow_ml::logprobs::LOGITS_CHUNK));
        // Shared-prefix scoring builds its own mask over a cached prefix: pair each example with
        // the other (sharing BOS) and with itself (sharing the whole prompt).
        let pairs: Vec<(&Sequence, &Sequence)> = vec![(&seqs[0], &seqs[1]), (&seqs[1], &seqs[1]), (&seqs[0], &seqs[0])];
        let (shared, _) = tch::no_grad(|| shared_prefix_logps(&model.net, &pairs, Device::Cpu, false, 10_000));
        for (i, e) in examples.iter().enumerate() {
            let (got, want) = (sums.double_value(&[i as i64]), e["logp"].as_f64().unwrap());
            eprintln!("{name}, example {i} ({} tokens): summed logp {got:.6} vs transformers {want:.6}", seqs[i].ids.len());
            assert!((got - want).abs() < 1e-3, "{name}, example {i}: {got} vs {want}");
        }
        let want = |i: usize| examples[i]["logp"].as_f64().unwrap();
        for (p, (a, b)) in [(0, 1), (1, 1), (0, 0)].into_iter().enumerate() {
            for (side, i) in [a, b].into_iter().enumerate() {
                let got = shared[p][side].logp;
                assert!((got - want(i)).abs() < 1e-3, "{name}, shared-prefix pair {p} side {side}: {got} vs {}", want(i));
            }
        }
    }
}

/// Greedy generation token for token, the cached logits equal to a full recompute, the sliding
/// layers' cache bounded to the window.
pub fn greedy_generation_matches_transformers_with_a_bounded_cache(reference: &str) {
    if common::stories_dir().is_none() {
        return;
    }
    let _no_grad = tch::no_grad_guard();
    for m in models(reference) {
        let name = m["name"].as_str().unwrap();
        let model = rebuild(&m, |_| {});
        let window = model.net.sliding_window().unwrap();
        let (_, sliding) = model.config.sliding_window_layers().unwrap();
        let prompt = ids(&m["greedy"]["prompt_ids"]);
        let expected = ids(&m["greedy"]["ids"]);
        assert!(prompt.len() as i64 > window && expected.len() > prompt.len() + 10, "{name}: prompt and generation longer than the window");
        eprintln!("{name}: smallest top-2 logit gap along transformers' greedy path {}", m["greedy"]["min_top2_gap"]);
        // Row 0 is transformers' prompt; row 1 a shorter one, so row 0 sits left-padded beside it.
        let short = &prompt[..4];
        let mut seqs = vec![prompt.clone(), short.to_vec()];
        let (mut decoder, mut logits) = Decoder::prefill(&model.net, &[&seqs[0], &seqs[1]], Device::Cpu);
        while seqs[0].len() < expected.len() {
            let mut next = Vec::new();
            for (row, seq) in seqs.iter_mut().enumerate() {
                let full = model.net.forward(&Tensor::from_slice(seq).unsqueeze(0)).get(0).get(seq.len() as i64 - 1);
                let diff = (logits.get(row as i64) - full).abs().max().double_value(&[]);
                assert!(diff < 1e-4, "{name}, row {row} at {} tokens: cached logits differ from a full recompute by {diff}", seq.len());
                let token = logits.get(row as i64).argmax(0, false).int64_value(&[]);
                seq.push(token);
                next.push(token);
            }
            for (layer, columns) in decoder.cache().layer_columns().into_iter().enumerate() {
                if sliding[layer] {
                    assert!(columns < window, "{name}: sliding layer {layer} caches {columns} columns, window {window}");
                }
            }
            logits = decoder.step(&next);
        }
        assert_eq!(seqs[0], expected, "{name}: greedy generation differs from transformers");
    }
}
