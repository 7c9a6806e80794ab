//! Qwen3, Gemma 2 and Gemma 3 (text) against transformers on random tiny models written by
//! `halo-init --arch qwen3|gemma2|gemma3`, each with sliding-window layers (Qwen3's from
//! `max_window_layers` on; Gemma's alternating with global ones, Gemma 3's with their own RoPE
//! base), a `query_pre_attn_scalar` other than the head width (Gemma) and soft-capping that
//! bites (Gemma 2): per-token logits within 2e-4 (single and right-padded) for prompts longer
//! than the window, summed completion log-probs within 1e-3 (plain and shared-prefix scoring),
//! greedy generation token for token with the sliding layers' KV cache bounded to the window;
//! and in bf16, logits as transformers' bf16 ones.
//! Reference: tests/data/arch_reference.json, made by ci/parity/make_arch_reference.py (which
//! says how the models were written); the test rebuilds the same random weights from the
//! stored config and seed, as halo-init does, and checks their checksum.

mod common;
mod tiny;
mod windowed;

const REFERENCE: &str = "arch_reference.json";

#[test]
fn logits_match_transformers_beyond_the_window() {
    windowed::logits_match_transformers_beyond_the_window(REFERENCE);
}

#[test]
fn completion_logps_match_transformers_plain_and_shared_prefix() {
    windowed::completion_logps_match_transformers_plain_and_shared_prefix(REFERENCE);
}

#[test]
fn greedy_generation_matches_transformers_with_a_bounded_cache() {
    windowed::greedy_generation_matches_transformers_with_a_bounded_cache(REFERENCE);
}

/// In bf16 (weights cast from the same f32 ones), haloflow's logits are within a tenth of how
/// far bf16 moves transformers' logits from f32 (measured: equal bit for bit, against
/// transformers' SDPA attention, or eager for Gemma 2): the dtype casts (Gemma's embedding
/// scale rounded to the dtype, norms computed in f32 and cast back) happen where transformers
/// does them. A bf16 matmul rounds differently on another CPU (transformers' own Gemma 2
/// logits moved by one bf16 step, 0.0625, between two machines), so the reference holds
/// transformers' logits of each CPU kind recorded (`bf16.other_cpus`,
/// `make_arch_reference.py --add-cpu`) and the nearest one counts.
#[test]
fn bf16_logits_follow_transformers_bf16() {
    if common::stories_dir().is_none() {
        return;
    }
    for m in common::reference(REFERENCE)["models"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let mut model = tiny::rebuild(m, |_| {});
        model.vs.set_kind(tch::Kind::BFloat16);
        let bf16 = &m["bf16"];
        let ids = common::ids(&bf16["ids"]);
        let got = tch::no_grad(|| model.net.forward(&tch::Tensor::from_slice(&ids).unsqueeze(0))).squeeze_dim(0).to_kind(tch::Kind::Float);
        let others = bf16["other_cpus"].as_array().map(Vec::as_slice).unwrap_or_default();
        let references = std::iter::once(("the reference's CPU", &bf16["logits"]))
            .chain(others.iter().map(|o| (o["cpu"].as_str().unwrap(), &o["logits"])));
        let (diff, cpu) = references
            .map(|(cpu, logits)| ((&got - common::logits_of(logits)).abs().max().double_value(&[]), cpu))
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        let f32_gap = bf16["f32_max_logit_difference"].as_f64().unwrap();
        eprintln!("{name}, bf16: max abs logit difference {diff:.2e} from transformers on {cpu} (bf16 vs f32 in transformers: {f32_gap:.2e})");
        assert!(diff <= f32_gap / 10.0, "{name}: bf16 logits differ by {diff}, bf16 itself moves them by {f32_gap}");
    }
}

#[test]
fn every_new_architecture_is_in_the_reference() {
    let reference = common::reference(REFERENCE);
    let types: Vec<&str> = reference["models"].as_array().unwrap().iter().map(|m| m["config"]["model_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["qwen3", "gemma2", "gemma3_text"]);
}
