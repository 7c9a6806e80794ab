//! Qwen3, Gemma 2 and Gemma 3 (text) against transformers on random tiny models written by
//! `halo-init --arch qwen3|gemma2|gemma3`, each with sliding-window layers (Qwen3's from
//! `max_window_layers` on; Gemma's alternating with global ones, Gemma 3's with their own RoPE
//! base), a `query_pre_attn_scalar` other than the head width (Gemma) and soft-capping that
//! bites (Gemma 2): per-token logits within 2e-4 (single and right-padded) for prompts longer
//! than the window, summed completion log-probs within 1e-3 (plain and shared-prefix scoring),
//! greedy generation token for token with the sliding layers' KV cache bounded to the window.
//! Reference: tests/data/arch_reference.json, made by ci/parity/make_arch_reference.py (which
//! says how the models were written); the test rebuilds the same random weights from the
//! stored config and seed, as halo-init does, and checks their checksum.

mod common;
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

#[test]
fn every_new_architecture_is_in_the_reference() {
    let reference = common::reference(REFERENCE);
    let types: Vec<&str> = reference["models"].as_array().unwrap().iter().map(|m| m["config"]["model_type"].as_str().unwrap()).collect();
    assert_eq!(types, ["qwen3", "gemma2", "gemma3_text"]);
}
