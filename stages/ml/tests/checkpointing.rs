//! Activation checkpointing (`recompute.rs`): the gradients of every trained tensor equal
//! those of the ordinary graph within 1e-5, for KTO (with KL partners), DPO (chosen and
//! rejected as two forwards), both with shared prompts on every architecture, PPO (value head on the detached hidden states), with a frozen
//! embedding (as with LoRA adapters), with a sliding window, on Qwen3, Gemma 2 and Gemma 3, in bf16, on stories260K (tied embeddings, real weights)
//! and on a random 4-layer model; forwards without gradient or with a KV cache record nothing.

use std::collections::BTreeMap;
use std::path::Path;

use haloflow_ml::config::Config;
use haloflow_ml::network::KvCache;
use haloflow_ml::logprobs::{sequence_logps, shared_prefix_pass, target_logps, Batch, Sequence, LOGITS_CHUNK};
use haloflow_ml::losses::ppo::{TokenLogps, ValueHead};
use haloflow_ml::losses::{by_name, KlPartners, LossInputs, Sums};
use haloflow_ml::model::CausalLm;
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const TOLERANCE: f64 = 1e-5;

fn random_model(layers: usize, kind: Kind) -> CausalLm {
    random_model_of("llama", None, layers, kind)
}

fn random_model_of(model_type: &str, sliding_window: Option<usize>, layers: usize, kind: Kind) -> CausalLm {
    let mut json = serde_json::json!({
        "model_type": model_type, "vocab_size": 96, "hidden_size": 32, "intermediate_size": 48,
        "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
        "max_position_embeddings": 128, "tie_word_embeddings": false, "initializer_range": 0.2,
        "sliding_window": sliding_window
    });
    if model_type == "qwen3" {
        json["use_sliding_window"] = serde_json::json!(true);
        json["max_window_layers"] = serde_json::json!(1);
    }
    let config: Config = serde_json::from_value(json).unwrap();
    tch::manual_seed(7);
    CausalLm::random(config, Path::new("."), Device::Cpu, kind).unwrap()
}

fn stories() -> Option<CausalLm> {
    let dir = haloflow::shared::path("models/stories260K")?;
    Some(CausalLm::load(&dir, Device::Cpu, Kind::Float).unwrap())
}

/// Deterministic sequences of varied lengths (so batches are right-padded), ids in 3..vocab.
fn sequences(count: usize, vocab: usize, seed: usize) -> Vec<Sequence> {
    (0..count)
        .map(|i| {
            let len = 7 + (i * 5 + seed) % 9;
            let ids = (0..len).map(|j| 3 + ((i * 31 + j * 17 + seed * 13 + j * j) % (vocab - 3)) as i64).collect();
            Sequence { ids, completion_start: 3 + (i + seed) % 3 }
        })
        .collect()
}

fn sums(model: &CausalLm, seqs: &[Sequence], grad: bool) -> (Tensor, Tensor) {
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::new(&refs, 0, Device::Cpu);
    if grad {
        sequence_logps(&model.net, &batch, haloflow_ml::logprobs::LOGITS_CHUNK)
    } else {
        tch::no_grad(|| sequence_logps(&model.net, &batch, haloflow_ml::logprobs::LOGITS_CHUNK))
    }
}

/// Fixed "reference" sums for the losses: the policy's own, shifted.
fn shifted(t: &Tensor, by: f64) -> Tensor {
    t.detach().to_kind(Kind::Double) + by
}

fn kto_loss(model: &CausalLm) -> Tensor {
    let vocab = model.config.vocab_size;
    let (rows, partners) = (sequences(4, vocab, 1), sequences(4, vocab, 2));
    let (s_pol, n) = sums(model, &rows, true);
    let (kl_pol, _) = sums(model, &partners, false);
    let desirable = Tensor::from_slice(&[true, false, true, false]);
    let inputs = LossInputs::binary(Sums::new(s_pol.shallow_clone(), Some(shifted(&s_pol, 0.3)), n), desirable)
        .with_kl(KlPartners { reference: shifted(&kl_pol, -0.2), policy: kl_pol });
    by_name("kto", &Default::default()).unwrap().loss(&inputs).unwrap().loss
}

fn dpo_loss(model: &CausalLm) -> Tensor {
    let vocab = model.config.vocab_size;
    let (chosen, rejected) = (sequences(3, vocab, 3), sequences(3, vocab, 4));
    let (c, nc) = sums(model, &chosen, true);
    let (r, nr) = sums(model, &rejected, true);
    let inputs = LossInputs::paired(Sums::new(c.shallow_clone(), Some(shifted(&c, 0.5)), nc), Sums::new(r.shallow_clone(), Some(shifted(&r, -0.5)), nr));
    by_name("dpo", &Default::default()).unwrap().loss(&inputs).unwrap().loss
}

/// Pairs sharing a prompt: each sequence of `sequences(count, vocab, seed)` and a partner with
/// its prompt and another sequence's completion.
fn prompt_pairs(count: usize, vocab: usize, seed: usize) -> Vec<(Sequence, Sequence)> {
    let (firsts, others) = (sequences(count, vocab, seed), sequences(count, vocab, seed + 10));
    firsts
        .into_iter()
        .zip(others)
        .map(|(a, o)| {
            let p = a.completion_start;
            let b = Sequence { ids: [&a.ids[..p], &o.ids[o.completion_start..]].concat(), completion_start: p };
            (a, b)
        })
        .collect()
}

/// KTO and DPO with each pair's prompt run once (`shared_prefix_pass`, as the trainer runs
/// them): KTO's completions with gradient and KL partners without, DPO's both sides with.
fn shared_losses(model: &CausalLm) -> Tensor {
    let vocab = model.config.vocab_size;
    let owned = prompt_pairs(4, vocab, 6);
    let pairs: Vec<(&Sequence, &Sequence)> = owned.iter().map(|(a, b)| (a, b)).collect();
    let kto = shared_prefix_pass(&model.net, &pairs, Device::Cpu, usize::MAX, LOGITS_CHUNK, [Some(true), Some(false)]);
    let (sums, counts) = (kto.sums().view([4, 2]), kto.counts().view([4, 2]));
    let (s_pol, kl_pol) = (sums.select(1, 0), sums.select(1, 1));
    let inputs = LossInputs::binary(Sums::new(s_pol.shallow_clone(), Some(shifted(&s_pol, 0.3)), counts.select(1, 0)), Tensor::from_slice(&[true, false, true, false]))
        .with_kl(KlPartners { reference: shifted(&kl_pol, -0.2), policy: kl_pol });
    let kto = by_name("kto", &Default::default()).unwrap().loss(&inputs).unwrap().loss;
    let dpo = shared_prefix_pass(&model.net, &pairs[..3], Device::Cpu, 12, LOGITS_CHUNK, [Some(true), Some(true)]);
    let (sums, counts) = (dpo.sums().view([3, 2]), dpo.counts().view([3, 2]));
    let (c, r) = (sums.select(1, 0), sums.select(1, 1));
    let inputs = LossInputs::paired(Sums::new(c.shallow_clone(), Some(shifted(&c, 0.5)), counts.select(1, 0)), Sums::new(r.shallow_clone(), Some(shifted(&r, -0.5)), counts.select(1, 1)));
    kto + by_name("dpo", &Default::default()).unwrap().loss(&inputs).unwrap().loss
}

/// PPO's inputs as the trainer builds them: log-probs and values from one forward, the value
/// head reading the detached hidden states.
fn ppo_loss(model: &CausalLm, head: &ValueHead) -> Tensor {
    let seqs = sequences(3, model.config.vocab_size, 5);
    let refs: Vec<&Sequence> = seqs.iter().collect();
    let batch = Batch::new(&refs, 0, Device::Cpu);
    let (b, t) = batch.input_ids.size2().unwrap();
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0).expand([b, t], false);
    let hidden = model.net.hidden_states(&batch.input_ids, &positions, None, None);
    let logps = target_logps(&model.net.logits(&hidden), &batch);
    let values = head.forward(&hidden.narrow(1, 0, t - 1).detach().to_kind(Kind::Float));
    let sums = Sums::new(logps.sum_dim_intlist([-1].as_slice(), false, Kind::Float), None, batch.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float));
    let tokens = TokenLogps { reference: (logps.detach() - 0.1) * &batch.target_mask, policy: logps, mask: batch.target_mask.shallow_clone(), values };
    let inputs = LossInputs::binary(sums, Tensor::from_slice(&[true, false, true])).with_tokens(tokens);
    by_name("ppo", &Default::default()).unwrap().loss(&inputs).unwrap().loss
}

/// Gradients (as f64) of every tensor of `stores` that requires grad, after one backward of
/// `loss` with checkpointing `on` or off.
fn gradients(model: &CausalLm, stores: &[&VarStore], on: bool, loss: impl Fn(&CausalLm) -> Tensor) -> BTreeMap<String, Tensor> {
    let vars: Vec<(String, Tensor)> = stores.iter().flat_map(|vs| vs.variables()).collect();
    for (_, v) in &vars {
        let mut g = v.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    model.net.set_checkpointing(on);
    let loss = loss(model);
    assert_eq!(model.net.pending_backward() > 0, on, "a forward with gradient is recorded exactly when checkpointing is on");
    loss.backward();
    model.net.finish_backward().unwrap();
    assert_eq!(model.net.pending_backward(), 0);
    model.net.set_checkpointing(false);
    vars.into_iter().filter(|(_, v)| v.requires_grad()).map(|(k, v)| (k, v.grad().to_kind(Kind::Double))).collect()
}

/// Checkpointed gradients equal the ordinary ones within `tolerance` (max abs difference, and
/// every gradient defined and non-zero somewhere); returns the largest difference.
fn assert_same_gradients(model: &CausalLm, stores: &[&VarStore], tolerance: f64, loss: impl Fn(&CausalLm) -> Tensor) -> f64 {
    let plain = gradients(model, stores, false, &loss);
    let checkpointed = gradients(model, stores, true, &loss);
    assert_eq!(plain.keys().collect::<Vec<_>>(), checkpointed.keys().collect::<Vec<_>>());
    let mut worst = 0f64;
    for (name, g) in &plain {
        let c = &checkpointed[name];
        assert!(g.defined() && c.defined(), "{name}: gradient missing");
        assert!(g.abs().max().double_value(&[]) > 0.0, "{name}: zero gradient, the comparison would prove nothing");
        let diff = (g - c).abs().max().double_value(&[]);
        assert!(diff <= tolerance, "{name}: checkpointed gradient differs by {diff}");
        worst = worst.max(diff);
    }
    worst
}

#[test]
fn kto_and_dpo_gradients_match_on_a_random_four_layer_model() {
    let model = random_model(4, Kind::Float);
    let kto = assert_same_gradients(&model, &[&model.vs], TOLERANCE, kto_loss);
    let dpo = assert_same_gradients(&model, &[&model.vs], TOLERANCE, dpo_loss);
    eprintln!("random 4-layer: max |Δgrad| kto {kto:.2e}, dpo {dpo:.2e}");
}

#[test]
fn kto_and_dpo_gradients_match_on_stories260k() {
    let Some(model) = stories() else { return };
    let kto = assert_same_gradients(&model, &[&model.vs], TOLERANCE, kto_loss);
    let dpo = assert_same_gradients(&model, &[&model.vs], TOLERANCE, dpo_loss);
    eprintln!("stories260K: max |Δgrad| kto {kto:.2e}, dpo {dpo:.2e}");
}

#[test]
fn ppo_gradients_match_with_the_value_head() {
    let model = random_model(4, Kind::Float);
    let value_vs = VarStore::new(Device::Cpu);
    let head = ValueHead::new(&(value_vs.root() / "value_head"), 32, 16);
    let diff = assert_same_gradients(&model, &[&model.vs, &value_vs], TOLERANCE, |m| ppo_loss(m, &head));
    eprintln!("ppo: max |Δgrad| {diff:.2e}");
}

#[test]
fn frozen_embedding_gets_no_gradient_and_the_layers_match() {
    // LoRA trains tensors inside the layers only: the walk-back must not need the embedding.
    let model = random_model(4, Kind::Float);
    let _ = model.vs.variables()["model.embed_tokens.weight"].set_requires_grad(false);
    let grads = gradients(&model, &[&model.vs], true, kto_loss);
    assert!(!grads.contains_key("model.embed_tokens.weight"));
    assert_same_gradients(&model, &[&model.vs], TOLERANCE, kto_loss);
}

#[test]
fn sliding_window_gradients_match() {
    // Sequences of 7 to 15 tokens against a window of 4: the recomputed layers use the window mask.
    let model = random_model_of("mistral", Some(4), 4, Kind::Float);
    assert_eq!(model.net.sliding_window(), Some(4));
    let diff = assert_same_gradients(&model, &[&model.vs], TOLERANCE, dpo_loss);
    eprintln!("sliding window: max |Δgrad| {diff:.2e}");
}

#[test]
fn qwen3_and_gemma_gradients_match() {
    // Per-head q/k norms, sandwich norms, soft-capped attention (Gemma 2) and the local RoPE of
    // Gemma 3's sliding layers are recomputed too.
    for model_type in ["qwen3", "gemma2", "gemma3_text"] {
        let model = random_model_of(model_type, Some(4), 4, Kind::Float);
        let kto = assert_same_gradients(&model, &[&model.vs], TOLERANCE, kto_loss);
        let dpo = assert_same_gradients(&model, &[&model.vs], TOLERANCE, dpo_loss);
        eprintln!("{model_type}: max |Δgrad| kto {kto:.2e}, dpo {dpo:.2e}");
    }
}

#[test]
fn shared_prompt_passes_match_on_every_architecture() {
    // A prompt and its continuations are one recorded forward, recomputed together: the
    // continuations' gradients reach the prompt through its recomputed keys and values.
    // Sequences of 7 to 15 tokens against a window of 4 on the windowed models.
    let models = [("llama", None), ("mistral", Some(4)), ("qwen3", Some(4)), ("gemma2", Some(4)), ("gemma3_text", Some(4))];
    for (model_type, window) in models {
        let model = random_model_of(model_type, window, 4, Kind::Float);
        let diff = assert_same_gradients(&model, &[&model.vs], TOLERANCE, shared_losses);
        eprintln!("{model_type} shared prompts: max |Δgrad| {diff:.2e}");
    }
}

#[test]
fn bf16_gradients_match() {
    let model = random_model(4, Kind::BFloat16);
    // bf16 has 8 bits of mantissa: the same operations in the same order give the same bits.
    let diff = assert_same_gradients(&model, &[&model.vs], 0.0, dpo_loss);
    eprintln!("bf16: max |Δgrad| {diff:.2e}");
}

#[test]
fn forwards_without_gradient_or_with_a_cache_are_not_recorded() {
    let model = random_model(2, Kind::Float);
    model.net.set_checkpointing(true);
    let seqs = sequences(2, 96, 0);
    let _ = sums(&model, &seqs, false);
    assert_eq!(model.net.pending_backward(), 0, "no_grad forward recorded");
    let ids = Tensor::from_slice(&seqs[0].ids).unsqueeze(0);
    let t = ids.size()[1];
    let positions = Tensor::arange(t, (Kind::Int64, Device::Cpu)).unsqueeze(0);
    let mut cache = KvCache::new();
    let with_cache = model.net.hidden_states(&ids, &positions, None, Some(&mut cache));
    assert_eq!(model.net.pending_backward(), 0, "forward with a cache recorded");
    assert!(with_cache.requires_grad(), "a forward with a cache keeps its ordinary graph");
    let _ = sums(&model, &seqs, true);
    assert_eq!(model.net.pending_backward(), 1);
    // A recorded forward the loss never used contributes nothing and is cleared.
    model.net.finish_backward().unwrap();
    assert_eq!(model.net.pending_backward(), 0);
}
