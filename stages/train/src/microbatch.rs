//! One microbatch's loss: the policy's and reference's log-probs of its rows, KTO's KL
//! partners and the step's reference point, PPO's per-token inputs.

use std::collections::HashMap;

use anyhow::{bail, ensure, Context, Result};
use haloflow_ml::dataset::{DataKind, EncodedRow};
use haloflow_ml::fingerprint::Fingerprint;
use haloflow_ml::logprobs::{sequence_logps, target_logps, token_logps, Batch, Sequence};
use haloflow_ml::losses::ppo::{TokenLogps, ValueHead};
use haloflow_ml::losses::{Halo, KlPartners, LossInputs, LossOutput, Sums};
use haloflow_ml::model::CausalLm;
use haloflow_ml::tokenize::Tokenizer;
use tch::{Device, Kind, Tensor};

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
fn logps(model: &CausalLm, seqs: &[&Sequence], device: Device, grad: bool) -> (Tensor, Tensor) {
    let batch = Batch::new(seqs, 0, device);
    if grad {
        sequence_logps(&model.net, &batch)
    } else {
        tch::no_grad(|| sequence_logps(&model.net, &batch))
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
        Reference::Live(model) => {
            let seqs: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[side]).collect();
            Some(logps(model, &seqs, job.device, false).0.to_kind(Kind::Double))
        }
        Reference::Base => {
            let seqs: Vec<&Sequence> = rows.iter().map(|r| &r.seqs[side]).collect();
            Some(policy.without_adapters(|| logps(policy, &seqs, job.device, false)).0.to_kind(Kind::Double))
        }
    })
}

/// The KL partners of a microbatch of a plan: policy (no gradient) and reference sums of
/// the rows' second sequences.
fn kl_partners(job: &Job, policy: &CausalLm, members: &[usize]) -> Result<KlPartners> {
    let second: Vec<&Sequence> = members.iter().map(|&i| &job.rows[i].seqs[1]).collect();
    let (kl_pol, _) = logps(policy, &second, job.device, false);
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

pub fn step_kl(job: &Job, policy: &CausalLm, mine: &[&[usize]]) -> Result<Option<StepKl>> {
    if job.kind != DataKind::Plan || !job.halo.needs_kl_partners() {
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
            let (s_pol, n) = logps(policy, &first, job.device, grad);
            let desirable: Vec<bool> = rows.iter().map(|r| job.labels[&r.id].desirable).collect();
            let weights: Vec<f64> = rows.iter().map(|r| job.labels[&r.id].weight).collect();
            let desirable = Tensor::from_slice(&desirable).to_device(job.device);
            if let Some(head) = job.value_head {
                let inputs = ppo_inputs(job, policy, head, &rows, &first, desirable, grad)?;
                return job.halo.loss(&inputs);
            }
            let mut inputs = LossInputs::binary(Sums::new(s_pol, reference_side(job, policy, members, 0)?, n), desirable);
            if job.halo.needs_kl_partners() {
                inputs = inputs.with_kl(match fixed {
                    Some((kl, _)) => KlPartners { policy: kl.policy.shallow_clone(), reference: kl.reference.shallow_clone() },
                    None => kl_partners(job, policy, members)?,
                });
            }
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
            let both: Vec<&Sequence> = first.iter().chain(&second).copied().collect();
            let (s_pol, n) = logps(policy, &both, job.device, grad);
            let (c, r) = (s_pol.narrow(0, 0, m), s_pol.narrow(0, m, m));
            let chosen = Sums::new(c, reference_side(job, policy, members, 0)?, n.narrow(0, 0, m));
            let rejected = Sums::new(r, reference_side(job, policy, members, 1)?, n.narrow(0, m, m));
            LossInputs::paired(chosen, rejected)
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
    let run = || {
        let (b, t) = batch.input_ids.size2().expect("(B, T) ids");
        let positions = Tensor::arange(t, (Kind::Int64, job.device)).unsqueeze(0).expand([b, t], false);
        let hidden = policy.net.hidden_states(&batch.input_ids, &positions, None, None);
        let logps = target_logps(&policy.net.logits(&hidden), &batch);
        let values = head.forward(&hidden.narrow(1, 0, t - 1).detach().to_kind(Kind::Float));
        (logps, values)
    };
    let (logps, values) = if grad { run() } else { tch::no_grad(run) };
    let reference = match job.reference {
        Reference::Live(model) => tch::no_grad(|| token_logps(&model.net, &batch)),
        Reference::Base => tch::no_grad(|| policy.without_adapters(|| token_logps(&policy.net, &batch))),
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
