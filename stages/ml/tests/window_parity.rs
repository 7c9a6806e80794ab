//! Sliding-window attention against transformers on random tiny models written by halo-init
//! (a Mistral whose every layer slides, a Qwen2 whose layers from `max_window_layers` on do),
//! with prompts longer than the window: per-token logits within 2e-4 (single and right-padded),
//! summed completion log-probs within 1e-3 (plain and shared-prefix scoring), and greedy
//! generation token for token with the sliding layers' KV cache bounded to the window.
//! Reference: tests/data/window_reference.json, made by ci/parity/make_window_reference.py
//! (which says how the models were written); the test rebuilds the same random weights from
//! the stored config and seed, as halo-init does, and checks their checksum.

mod common;
mod tiny;
mod windowed;

const REFERENCE: &str = "window_reference.json";

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
