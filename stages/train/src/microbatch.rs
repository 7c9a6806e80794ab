//! One microbatch's loss: the policy's and reference's log-probs of its rows, KTO's KL
//! partners and the step's reference point, PPO's per-token inputs.

use std::cell::Cell;
use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use haloflow_ml::dataset::{DataKind, EncodedRow};
use haloflow_ml::fingerprint::Fingerprint;
use haloflow_ml::logprobs::{sequence_logps, shareable_prefix, shared_prefix_pass, token_logps, Batch, Sequence};
use haloflow_ml::losses::ppo::{TokenLogps, ValueHead};
use haloflow_ml::losses::{Halo, KlPartners, LossInputs, LossOutput, Sums};
use haloflow_ml::model::CausalLm;
use haloflow_ml::recompute::grad_if;
use haloflow_ml::tokenize::Tokenizer;
use tch::{Device, Kind, Tensor};

use crate::metrics::Tokens;
use crate::refs::{self, RefRow};
use crate::Args;

/// Where reference log-probs come from.
pub enum Reference {
    /// The refcache Parquet, by row id.
    Cache(HashMap<String, RefRow>),
    /// A frozen second copy of the initial model.
    Live(Box<CausalLm>),
    /// The policy with its LoRA adapters switched off (the base model, no second copy).
    Base,
    /// The loss needs none.
    Free,
}

/// Per-row facts of binary feedback (from the plan).
pub struct Label {
    /// Desirable (true) or undesirable.
    pub desirable: bool,
    /// The example's weight.
    pub weight: f64,
}

/// Everything one microbatch's loss needs, fixed for the run.
pub struct Job<'a> {
    /// The loss.
    pub halo: &'a dyn Halo,
    /// Binary feedback (a plan) or pairs.
    pub kind: DataKind,
    /// Every tokenized row; microbatches hold indices into it.
    pub rows: &'a [EncodedRow],
    /// The plan's labels by row id.
    pub labels: &'a HashMap<String, Label>,
    /// Where reference log-probs come from.
    pub reference: &'a Reference,
    /// The plan's λ_D and λ_U.
    pub lambdas: Option<(f64, f64)>,
    /// The training device.
    pub device: Device,
    /// PPO's critic.
    pub value_head: Option<&'a ValueHead>,
    /// Whether sequences sharing a prompt run it once (`--share-prompts`).
    pub share: bool,
    /// Positions whose logits are computed at once (`--logits-chunk`).
    pub chunk: usize,
    /// Token positions the forward passes computed since last taken.
    pub tokens: Cell<Tokens>,
}

/// Where the loss's reference log-probs come from, as the arguments say.
pub fn reference(args: &Args, tok: &Tokenizer, halo: &dyn Halo, device: Device, kind: Kind) -> Result<Reference> {
    if !halo.needs_reference() {
        return Ok(Reference::Free);
    }
    let mode = args.reference.as_deref().unwrap_or(if args.ref_logps.is_some() { "cache" } else { "live" });
    match (mode, &args.ref_logps) {
        ("cache", Some(path)) => {
            let expected = Fingerprint::compute(&args.model, tok, &args.data, args.max_prompt_length, args.max_length)?;
            Ok(Reference::Cache(refs::load(path, &expected)?))
        }
        ("cache", None) => bail!("--reference cache needs --ref-logps (the output of halo-refcache)"),
        _ if args.lora.is_some() => Ok(Reference::Base),
        _ => Ok(Reference::Live(Box::new(CausalLm::load(&args.model, device, kind)?))),
    }
}

/// Summed log-probs of sequences (with or without gradient) and their token counts.
fn logps(job: &Job, model: &CausalLm, seqs: &[&Sequence], grad: bool) -> (Tensor, Tensor) {
    let batch = Batch::new(seqs, 0, job.device);
    job.count(Tokens { tokens: batch.tokens, forward: batch.tokens, padded: batch.padded() });
    grad_if(grad, || sequence_logps(&model.net, &batch, job.chunk))
}

/// Summed log-probs and token counts of the sequences of each row, `[first, second]`, each
/// row's shared prompt computed once ([`shared_prefix_pass`]); `sides[side]`: scored (`Some`,
/// with gradient when `Some(true)`) or skipped (zeros). A side without gradient continues from
/// the prompt's keys and values under no-grad, so it adds nothing to the backward pass while
/// the other side's gradient flows through the prompt. A side's results do not depend on
/// whether the other is scored in the same call, so a rank fusing KTO's KL pass into its
/// prompt pass computes what a process scoring them in two calls computes. Under activation
/// checkpointing the pass is checkpointed as a whole (prompt and continuations recomputed
/// together). None when prompt sharing is off or a row's sequences share no first token.
fn pair_logps(job: &Job, model: &CausalLm, rows: &[&EncodedRow], sides: [Option<bool>; 2]) -> Option<[(Tensor, Tensor); 2]> {
    let pairs: Vec<(&Sequence, &Sequence)> = rows.iter().map(|r| (&r.seqs[0], &r.seqs[1])).collect();
    if !job.share || pairs.iter().any(|(a, b)| shareable_prefix(a, b) == 0) {
        return None;
    }
    let pass = shared_prefix_pass(&model.net, &pairs, job.device, usize::MAX, job.chunk, sides);
    let tokens = rows.iter().flat_map(|r| r.seqs.iter().enumerate().filter(|(side, _)| sides[*side].is_some()).map(|(_, s)| s.ids.len())).sum();
    job.count(Tokens { tokens, forward: pass.forward, padded: pass.padded });
    let m = rows.len() as i64;
    let (sums, counts) = (pass.sums().view([m, 2]), pass.counts().view([m, 2]));
    Some([0, 1].map(|side| (sums.select(1, side), counts.select(1, side))))
}

/// Reference sums of both sequences of the rows, `[first, second]`: a live reference shares
/// each row's prompt as the policy does.
fn reference_sides(job: &Job, policy: &CausalLm, members: &[usize]) -> Result<[Option<Tensor>; 2]> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    if let Some(Some([a, b])) = with_reference(job, policy, |model| pair_logps(job, model, &rows, [Some(false), Some(false)])) {
        return Ok([Some(a.0.to_kind(Kind::Double)), Some(b.0.to_kind(Kind::Double))]);
    }
    Ok([reference_side(job, policy, members, 0)?, reference_side(job, policy, members, 1)?])
}

/// Runs `f` with the model that scores live reference log-probs — the frozen copy, or the
/// policy itself with its LoRA adapters switched off while `f` runs; None without a live
/// reference.
fn with_reference<T>(job: &Job, policy: &CausalLm, f: impl FnOnce(&CausalLm) -> T) -> Option<T> {
    match job.reference {
        Reference::Live(model) => Some(f(model)),
        Reference::Base => Some(policy.without_adapters(|| f(policy))),
        Reference::Cache(_) | Reference::Free => None,
    }
}

impl Job<'_> {
    /// Adds to the token positions computed.
    fn count(&self, tokens: Tokens) {
        self.tokens.set(self.tokens.get() + tokens);
    }
}

/// Reference sums of the rows' sequences `side` (0: first, 1: second).
fn reference_side(job: &Job, policy: &CausalLm, members: &[usize], side: usize) -> Result<Option<Tensor>> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    Ok(match job.reference {
        Reference::Free => None,
        Reference::Cache(map) => {
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            let sums: Vec<f64> = refs::lookup(map, &ids)?.iter().map(|r| r.sums[side]).collect();
            Some(Tensor::from_slice(&sums).to_device(job.device))
        }
        Reference::Live(_) | Reference::Base => with_reference(job, policy, |model| {
            // With prompts shared, as `reference_sides` computes it (the same bits).
            let sides = if side == 0 { [Some(false), None] } else { [None, Some(false)] };
            let sums = match pair_logps(job, model, &rows, sides) {
                Some(pair) => pair[side].0.shallow_clone(),
                None => logps(job, model, &rows.iter().map(|r| &r.seqs[side]).collect::<Vec<_>>(), false).0,
            };
            sums.to_kind(Kind::Double)
        }),
    })
}

/// The KL partners of a microbatch of a plan: policy (no gradient) and reference sums of
/// the rows' second sequences (continuing from the prompt pass when prompts are shared).
fn kl_partners(job: &Job, policy: &CausalLm, members: &[usize]) -> Result<KlPartners> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    let kl_pol = match pair_logps(job, policy, &rows, [None, Some(false)]) {
        Some([_, (kl, _)]) => kl,
        None => logps(job, policy, &rows.iter().map(|r| &r.seqs[1]).collect::<Vec<_>>(), false).0,
    };
    let reference = reference_side(job, policy, members, 1)?.with_context(|| format!("loss `{}` needs reference log-probs of the KL partners", job.halo.name()))?;
    Ok(KlPartners { policy: kl_pol, reference })
}

/// The KL partners of this rank's microbatches of an optimizer step and the step's
/// reference point, for a loss that reads KL partners.
pub struct StepKl {
    /// One per microbatch, in order.
    pub partners: Vec<KlPartners>,
    /// The step's reference point.
    pub z0: Option<Tensor>,
}

/// The KL partners and reference point of this rank's microbatches of a step, computed before
/// their losses. None when the loss reads no KL partners, or when prompt sharing is on and the
/// rank has one microbatch: its loss then computes the partners from the policy's prompt pass
/// ([`microbatch_loss`] without `fixed`), and the step's reference point is the microbatch's.
pub fn step_kl(job: &Job, policy: &CausalLm, mine: &[&[usize]]) -> Result<Option<StepKl>> {
    if job.kind != DataKind::Plan || !job.halo.needs_kl_partners() || (job.share && mine.len() == 1) {
        return Ok(None);
    }
    let partners: Vec<KlPartners> = mine.iter().map(|m| kl_partners(job, policy, m)).collect::<Result<_>>()?;
    let z0 = job.halo.step_reference_point(&partners.iter().collect::<Vec<_>>())?;
    Ok(Some(StepKl { partners, z0 }))
}

/// The loss of one microbatch.
/// `fixed` gives KL partners computed beforehand and the step's reference point; without it
/// the loss takes them from the microbatch alone (evaluation).
pub fn microbatch_loss(job: &Job, policy: &CausalLm, members: &[usize], grad: bool, fixed: Option<(&KlPartners, Option<&Tensor>)>) -> Result<LossOutput> {
    let rows: Vec<&EncodedRow> = members.iter().map(|&i| &job.rows[i]).collect();
    let first: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[0]).collect();
    let second: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[1]).collect();
    let m = rows.len() as i64;
    let inputs = match job.kind {
        DataKind::Plan => {
            let desirable: Vec<bool> = rows.iter().map(|r| job.labels[&r.id].desirable).collect();
            let weights: Vec<f64> = rows.iter().map(|r| job.labels[&r.id].weight).collect();
            let desirable = Tensor::from_slice(&desirable).to_device(job.device);
            if let Some(head) = job.value_head {
                let inputs = ppo_inputs(job, policy, head, &rows, &first, desirable, grad)?;
                return job.halo.loss(&inputs);
            }
            // With the KL partners to compute here, the completions (with gradient) and the
            // partners (without) continue from one prompt pass; with partners given, the
            // completions continue from their own prompt pass, as `kl_partners` computed them.
            let needs_kl = job.halo.needs_kl_partners();
            let shared = match (needs_kl, fixed) {
                (true, None) => pair_logps(job, policy, &rows, [Some(grad), Some(false)]),
                (true, Some(_)) => pair_logps(job, policy, &rows, [Some(grad), None]),
                (false, _) => None,
            };
            let (s_pol, n, kl_pol) = match shared {
                Some([(s_pol, n), (kl_pol, _)]) => (s_pol, n, fixed.is_none().then_some(kl_pol)),
                None => {
                    let (s_pol, n) = logps(job, policy, &first, grad);
                    (s_pol, n, None)
                }
            };
            let [ref_first, ref_second] = if kl_pol.is_some() { reference_sides(job, policy, members)? } else { [reference_side(job, policy, members, 0)?, None] };
            let inputs = LossInputs::binary(Sums::new(s_pol, ref_first, n), desirable);
            let mut inputs = match (needs_kl, fixed, kl_pol) {
                (false, _, _) => inputs,
                (true, Some((kl, _)), _) => inputs.with_kl(KlPartners { policy: kl.policy.shallow_clone(), reference: kl.reference.shallow_clone() }),
                (true, None, Some(kl_pol)) => {
                    let reference = ref_second.with_context(|| format!("loss `{}` needs reference log-probs of the KL partners", job.halo.name()))?;
                    inputs.with_kl(KlPartners { policy: kl_pol, reference })
                }
                (true, None, None) => inputs.with_kl(kl_partners(job, policy, members)?),
            };
            if let Some((_, Some(z0))) = fixed {
                inputs = inputs.with_reference_point(z0.shallow_clone());
            }
            if weights.iter().any(|&w| w != 1.0) {
                inputs = inputs.with_weights(Tensor::from_slice(&weights).to_device(job.device));
            }
            if let Some((d, u)) = job.lambdas {
                inputs = inputs.with_lambdas(d, u);
            }
            inputs
        }
        DataKind::Paired => {
            let ([(c, nc), (r, nr)], [ref_c, ref_r]) = match pair_logps(job, policy, &rows, [Some(grad), Some(grad)]) {
                Some(sides) => (sides, reference_sides(job, policy, members)?),
                None => {
                    let both: Vec<&Sequence> = first.iter().chain(&second).copied().collect();
                    let (s_pol, n) = logps(job, policy, &both, grad);
                    let sides = [(s_pol.narrow(0, 0, m), n.narrow(0, 0, m)), (s_pol.narrow(0, m, m), n.narrow(0, m, m))];
                    (sides, [reference_side(job, policy, members, 0)?, reference_side(job, policy, members, 1)?])
                }
            };
            LossInputs::paired(Sums::new(c, ref_c, nc), Sums::new(r, ref_r, nr))
        }
    };
    job.halo.loss(&inputs)
}

/// Width of PPO's value head.
pub const VALUE_HEAD_WIDTH: i64 = 128;

/// PPO's per-token inputs: policy log-probs and values from one forward pass (the value head
/// reads the detached hidden states), reference log-probs per token from the cache (refcache
/// with `per_token = true`) or the live reference.
fn ppo_inputs(job: &Job, policy: &CausalLm, head: &ValueHead, rows: &[&EncodedRow], seqs: &[&Sequence], desirable: Tensor, grad: bool) -> Result<LossInputs> {
    let batch = Batch::new(seqs, 0, job.device);
    job.count(Tokens { tokens: batch.tokens, forward: batch.tokens, padded: batch.padded() });
    let run = || {
        let t = batch.input_ids.size()[1];
        let hidden = batch.hidden_states(&policy.net);
        let logps = batch.dense(&batch.completion_logps(&policy.net, &hidden, job.chunk));
        let values = head.forward(&hidden.narrow(1, 0, t - 1).detach().to_kind(Kind::Float));
        (logps, values)
    };
    let (logps, values) = grad_if(grad, run);
    let reference = match job.reference {
        Reference::Live(_) | Reference::Base => {
            job.count(Tokens { tokens: batch.tokens, forward: batch.tokens, padded: batch.padded() });
            with_reference(job, policy, |model| tch::no_grad(|| token_logps(&model.net, &batch, job.chunk))).expect("a live reference")
        }
        Reference::Cache(map) => {
            let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
            let t = batch.target_mask.size()[1] as usize;
            let mut dense = vec![0f32; rows.len() * t];
            for (i, (found, s)) in refs::lookup(map, &ids)?.into_iter().zip(seqs).enumerate() {
                let tokens = found.tokens.as_ref().context("PPO needs per-token reference log-probs: run refcache with per_token = true")?;
                ensure!(tokens.len() == s.ids.len() - s.completion_start, "row `{}`: the cache has {} per-token log-probs for {} completion tokens", ids[i], tokens.len(), s.ids.len() - s.completion_start);
                dense[i * t + s.completion_start - 1..i * t + s.ids.len() - 1].copy_from_slice(tokens);
            }
            Tensor::from_slice(&dense).view([rows.len() as i64, t as i64]).to_device(job.device)
        }
        Reference::Free => bail!("PPO needs reference log-probs"),
    };
    let sums = Sums::new(logps.sum_dim_intlist([-1].as_slice(), false, Kind::Float), None, batch.target_mask.sum_dim_intlist([-1].as_slice(), false, Kind::Float));
    Ok(LossInputs::binary(sums, desirable).with_tokens(TokenLogps { policy: logps, reference: reference.to_kind(Kind::Float), mask: batch.target_mask.shallow_clone(), values }))
}
