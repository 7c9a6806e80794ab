//! The human-aware losses (HALOs) of `shared/spec/LOSSES.md` on `tch` tensors: KTO, APO-zero,
//! offline PPO, SFT/CSFT (binary feedback) and DPO, cDPO, IPO, SimPO, SLiC, ORPO (pairs).
//!
//! Every loss implements [`Halo`] in its own module, so a new HALO is one small file plus a line
//! in [`by_name`]. A loss reads [`LossInputs`] — per example the policy's summed completion
//! log-probs `S_pol` (carrying the gradient), the reference's `S_ref` (never differentiated)
//! and the completion token counts `n` — and returns a [`LossOutput`]: the mean over the
//! microbatch's examples, detached per-example losses and [`Metrics`]. The implied reward is
//! `r = S_pol − S_ref`; reported rewards are `β·r`, detached. Microbatches of one optimizer step
//! are combined with [`Accumulator`], a mean of means weighted by example count.

mod accumulate;
pub mod apo_zero;
pub mod dpo;
pub mod ipo;
pub mod kto;
pub mod orpo;
mod params;
pub mod ppo;
pub mod sft;
pub mod simpo;
pub mod slic;

use std::sync::Arc;

use anyhow::{bail, ensure, Result};
use serde_json::{Map, Value};
use tch::{Kind, Tensor};

pub use accumulate::Accumulator;
use params::Params;

/// The names [`by_name`] knows, in the order of the spec.
pub const NAMES: [&str; 11] = ["kto", "apo_zero", "ppo", "sft", "csft", "dpo", "cdpo", "ipo", "simpo", "slic", "orpo"];

/// Builds the loss `name` from a pipeline's params (β `beta`, ε `epsilon`, τ `tau`, γ `gamma`,
/// δ `delta`, λ `lambda`, λ_D `lambda_d`, λ_U `lambda_u`, PPO's `clip`), with the spec's defaults
/// for those left out. An unknown name lists the known ones; a param the loss does not take, a
/// value that is not a number or one out of range is an error naming the param.
pub fn by_name(name: &str, params: &Map<String, Value>) -> Result<Box<dyn Halo>> {
    let p = Params::new(name, params);
    let halo: Box<dyn Halo> = match name {
        "kto" => Box::new(kto::Kto::from_params(&p)?),
        "apo_zero" => Box::new(apo_zero::ApoZero::from_params(&p)?),
        "ppo" => Box::new(ppo::Ppo::from_params(&p)?),
        "sft" => Box::new(sft::Sft { control: false }),
        "csft" => Box::new(sft::Sft { control: true }),
        "dpo" => Box::new(dpo::Dpo::from_params(&p, false)?),
        "cdpo" => Box::new(dpo::Dpo::from_params(&p, true)?),
        "ipo" => Box::new(ipo::Ipo::from_params(&p)?),
        "simpo" => Box::new(simpo::Simpo::from_params(&p)?),
        "slic" => Box::new(slic::Slic::from_params(&p)?),
        "orpo" => Box::new(orpo::Orpo::from_params(&p)?),
        _ => bail!("unknown loss `{name}`; known losses: {}", NAMES.join(", ")),
    };
    p.finish()?;
    Ok(halo)
}

/// A human-aware loss.
pub trait Halo: Send {
    /// The name [`by_name`] knows it by.
    fn name(&self) -> &'static str;
    /// The feedback it learns from.
    fn data(&self) -> DataNeed;
    /// Whether it needs reference log-probs (`S_ref`, or per-token ones for PPO).
    fn needs_reference(&self) -> bool;
    /// The loss of one microbatch: the mean over its examples, differentiable w.r.t. `S_pol`.
    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput>;
    /// The fewest rows a microbatch may hold (KTO: 2, for its mismatched KL pairs).
    fn min_rows_per_microbatch(&self) -> usize {
        1
    }
    /// Whether it reads the rows' KL partners ([`LossInputs::kl`], KTO).
    fn needs_kl_partners(&self) -> bool {
        false
    }
    /// Whether it trains a value head beside the policy and reads per-token log-probs (PPO).
    fn needs_value_head(&self) -> bool {
        false
    }
    /// The completion the loss learns from for a completion of label `desirable` (CSFT puts
    /// its control token first); `None` keeps it as it is.
    fn rewrite_completion(&self, _completion: &str, _desirable: bool) -> Option<String> {
        None
    }
    /// The reference point of a whole optimizer step, from the KL partners of every
    /// microbatch this process runs in it, all-reduced over processes (KTO's z0). Given to each
    /// of the step's microbatches with [`LossInputs::with_reference_point`], it makes z0 the
    /// estimate over the step's whole batch, so N processes equal one process accumulating the
    /// same microbatches. `None` for losses without one.
    fn step_reference_point(&self, _kl: &[&KlPartners]) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// Installs the all-reduce of a distributed run. Losses with a batch statistic (KTO's
    /// reference point, PPO's advantage whitening) reduce it with it; the others ignore it.
    fn set_all_reduce(&mut self, _reduce: Arc<dyn AllReduce>) {}
}

/// The feedback a loss learns from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataNeed {
    /// Binary feedback: rows labelled desirable or undesirable.
    Binary,
    /// Preference pairs: a chosen and a rejected completion per prompt.
    Paired,
    /// Either of them (SFT and CSFT).
    Either,
}

/// Sums a small tensor of batch statistics over the processes of a distributed run.
pub trait AllReduce: Send + Sync {
    /// The element-wise sum of `stats` over all processes (a collective: every process calls it).
    fn sum(&self, stats: &Tensor) -> Result<Tensor>;
}

/// The all-reduce of a single process: the identity, the default of every loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl AllReduce for SingleProcess {
    fn sum(&self, stats: &Tensor) -> Result<Tensor> {
        Ok(stats.shallow_clone())
    }
}

/// Summed completion log-probs of a set of completions: the rows of binary data, or one side
/// of the pairs.
#[derive(Debug)]
pub struct Sums {
    /// `S_pol`, shape `(N,)`: summed log-probs under the policy, carrying the gradient.
    pub policy: Tensor,
    /// `S_ref`, shape `(N,)`: the same under the frozen reference (never differentiated);
    /// `None` for reference-free losses.
    pub reference: Option<Tensor>,
    /// `n`, shape `(N,)`: completion token counts (any numeric kind).
    pub n_tokens: Tensor,
}

impl Sums {
    /// Sums of `N` completions.
    pub fn new(policy: Tensor, reference: Option<Tensor>, n_tokens: Tensor) -> Sums {
        Sums { policy, reference, n_tokens }
    }

    /// `N`, after checking that every tensor is one-dimensional of that length.
    fn len(&self, loss: &str, what: &str) -> Result<i64> {
        let size = self.policy.size();
        ensure!(size.len() == 1, "`{loss}`: the policy log-probs of the {what} must be one-dimensional, got shape {size:?}");
        let same = |t: &Tensor| t.size() == size;
        ensure!(self.reference.as_ref().is_none_or(same), "`{loss}`: the reference log-probs of the {what} must have shape {size:?}");
        ensure!(same(&self.n_tokens), "`{loss}`: the token counts of the {what} must have shape {size:?}, got {:?}", self.n_tokens.size());
        Ok(size[0])
    }

    /// The implied reward `r = S_pol − S_ref`, differentiable through `S_pol` only.
    fn reward(&self, loss: &str, what: &str) -> Result<Tensor> {
        match &self.reference {
            Some(reference) => Ok(&self.policy - reference.detach()),
            None => bail!("`{loss}` needs reference log-probs (S_ref) of the {what}; none were given"),
        }
    }

    /// The token counts clamped to at least 1.
    fn n_clamped(&self) -> Tensor {
        self.n_tokens.clamp_min(1)
    }

    /// The mean token log-prob `S_pol / n` (n clamped ≥ 1).
    fn mean_logp(&self) -> Tensor {
        &self.policy / self.n_clamped()
    }
}

/// KTO's KL partners: per row i, the summed log-probs of the mismatched completion
/// `y'_i = y_{(i+1) mod m}` given `x_i` (the plan's `kl_completion`).
#[derive(Debug)]
pub struct KlPartners {
    /// `S_pol(y'_i|x_i)`, shape `(m,)`; used detached only.
    pub policy: Tensor,
    /// `S_ref(y'_i|x_i)`, shape `(m,)`.
    pub reference: Tensor,
}

/// The examples of a microbatch.
#[derive(Debug)]
pub enum Examples {
    /// Binary feedback.
    Binary {
        /// The rows' sums.
        rows: Sums,
        /// Labels, `(N,)` of kind `Bool`: true = desirable.
        desirable: Tensor,
    },
    /// Preference pairs: pair i is (chosen i, rejected i).
    Paired {
        /// The chosen completions' sums.
        chosen: Sums,
        /// The rejected completions' sums.
        rejected: Sums,
    },
}

/// Everything a loss may read about one microbatch.
#[derive(Debug)]
pub struct LossInputs {
    /// The examples.
    pub examples: Examples,
    /// KTO's KL partners, one per row.
    pub kl: Option<KlPartners>,
    /// Per-example weights `(N,)` (rows, or pairs): the loss becomes `mean_i w_i·l_i` over the
    /// counted examples, so accumulation still weights microbatches by example count.
    pub weights: Option<Tensor>,
    /// KTO's λ_D from the batch plan; a `lambda_d` param given to [`by_name`] takes precedence.
    pub lambda_d: Option<f64>,
    /// KTO's λ_U from the batch plan; a `lambda_u` param given to [`by_name`] takes precedence.
    pub lambda_u: Option<f64>,
    /// Per-token log-probs and values, for PPO.
    pub tokens: Option<ppo::TokenLogps>,
    /// A reference point fixed for the optimizer step ([`Halo::step_reference_point`]); when
    /// absent, KTO computes it from this microbatch's KL partners.
    pub reference_point: Option<Tensor>,
}

impl LossInputs {
    /// Inputs of binary feedback.
    pub fn binary(rows: Sums, desirable: Tensor) -> LossInputs {
        LossInputs::of(Examples::Binary { rows, desirable })
    }

    /// Inputs of preference pairs.
    pub fn paired(chosen: Sums, rejected: Sums) -> LossInputs {
        LossInputs::of(Examples::Paired { chosen, rejected })
    }

    fn of(examples: Examples) -> LossInputs {
        LossInputs { examples, kl: None, weights: None, lambda_d: None, lambda_u: None, tokens: None, reference_point: None }
    }

    /// With KTO's KL partners.
    pub fn with_kl(self, kl: KlPartners) -> LossInputs {
        LossInputs { kl: Some(kl), ..self }
    }

    /// With per-example weights.
    pub fn with_weights(self, weights: Tensor) -> LossInputs {
        LossInputs { weights: Some(weights), ..self }
    }

    /// With the batch plan's λ_D and λ_U.
    pub fn with_lambdas(self, lambda_d: f64, lambda_u: f64) -> LossInputs {
        LossInputs { lambda_d: Some(lambda_d), lambda_u: Some(lambda_u), ..self }
    }

    /// With the optimizer step's reference point (see [`Halo::step_reference_point`]).
    pub fn with_reference_point(self, z0: Tensor) -> LossInputs {
        LossInputs { reference_point: Some(z0), ..self }
    }

    /// With PPO's per-token log-probs and values.
    pub fn with_tokens(self, tokens: ppo::TokenLogps) -> LossInputs {
        LossInputs { tokens: Some(tokens), ..self }
    }

    /// The rows and labels of binary feedback, checked.
    fn binary_rows(&self, loss: &str) -> Result<(&Sums, &Tensor)> {
        let Examples::Binary { rows, desirable } = &self.examples else {
            bail!("`{loss}` learns from binary feedback, but the inputs are preference pairs");
        };
        let m = rows.len(loss, "rows")?;
        ensure!(
            desirable.kind() == Kind::Bool && desirable.size() == [m],
            "`{loss}`: the labels must be a Bool tensor of shape [{m}], got {:?} of shape {:?}",
            desirable.kind(),
            desirable.size()
        );
        Ok((rows, desirable))
    }

    /// The chosen and rejected sums of preference pairs, checked.
    fn pairs(&self, loss: &str) -> Result<(&Sums, &Sums)> {
        let Examples::Paired { chosen, rejected } = &self.examples else {
            bail!("`{loss}` learns from preference pairs, but the inputs are binary feedback");
        };
        let (c, r) = (chosen.len(loss, "chosen completions")?, rejected.len(loss, "rejected completions")?);
        ensure!(c == r, "`{loss}`: {c} chosen but {r} rejected completions");
        Ok((chosen, rejected))
    }
}

/// The loss of one microbatch.
#[derive(Debug)]
pub struct LossOutput {
    /// The scalar loss: the (weighted) mean over the counted examples, differentiable.
    pub loss: Tensor,
    /// Per-example losses `(N,)`, detached and unweighted, aligned with the rows (binary data)
    /// or pairs; examples the loss ignores (undesirable rows under SFT) hold 0.
    pub per_example: Tensor,
    /// How many examples the mean is over: the weight of this microbatch in accumulation.
    pub count: usize,
    /// What to log.
    pub metrics: Metrics,
}

/// Detached metrics of one microbatch; `None` where undefined (a class absent, a loss without
/// implied rewards).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Mean reported reward (`β·r`, or the loss's own implied reward) of the chosen/desirable completions.
    pub rewards_chosen: Option<f64>,
    /// Mean reported reward of the rejected/undesirable completions.
    pub rewards_rejected: Option<f64>,
    /// Mean of chosen − rejected reward per pair (paired data), or the difference of the two
    /// class means (binary data).
    pub margins: Option<f64>,
    /// Fraction of pairs whose chosen reward exceeds the rejected one (paired data).
    pub accuracy: Option<f64>,
    /// KTO's reference point z0.
    pub kl: Option<f64>,
    /// Loss-specific values (PPO's parts).
    pub extra: Vec<(&'static str, f64)>,
}

impl Metrics {
    /// Metrics of paired data from the chosen and rejected rewards `(N,)`.
    fn paired(chosen: &Tensor, rejected: &Tensor) -> Metrics {
        let (chosen, rejected) = (chosen.detach(), rejected.detach());
        Metrics {
            rewards_chosen: mean_of(&chosen),
            rewards_rejected: mean_of(&rejected),
            margins: mean_of(&(&chosen - &rejected)),
            accuracy: mean_of(&chosen.gt_tensor(&rejected)),
            ..Metrics::default()
        }
    }

    /// Metrics of binary data from the rows' rewards `(N,)` and labels.
    fn binary(rewards: &Tensor, desirable: &Tensor) -> Metrics {
        let rewards = rewards.detach();
        let chosen = mean_of(&rewards.masked_select(desirable));
        let rejected = mean_of(&rewards.masked_select(&desirable.logical_not()));
        Metrics {
            rewards_chosen: chosen,
            rewards_rejected: rejected,
            margins: chosen.zip(rejected).map(|(c, r)| c - r),
            ..Metrics::default()
        }
    }

    /// The defined metrics under their logging names (`rewards/chosen`, `rewards/rejected`,
    /// `rewards/margins`, `rewards/accuracies`, `kl`, then the loss-specific ones).
    pub fn entries(&self) -> Vec<(&'static str, f64)> {
        let named = [
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/margins", self.margins),
            ("rewards/accuracies", self.accuracy),
            ("kl", self.kl),
        ];
        named.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).chain(self.extra.iter().copied()).collect()
    }
}

/// The mean of a tensor as f64, `None` when it is empty.
fn mean_of(t: &Tensor) -> Option<f64> {
    (t.numel() > 0).then(|| t.mean(Kind::Double).double_value(&[]))
}

/// `−log σ(x)`, the logistic loss.
fn neg_log_sigmoid(x: &Tensor) -> Tensor {
    -x.log_sigmoid()
}

/// Reduces per-example losses `(N,)` to a [`LossOutput`]: the mean of `w_i·l_i` over the
/// examples in `counted` (all when `None`), with the weights of `inputs`.
fn finish(loss: &str, per_example: Tensor, counted: Option<&Tensor>, inputs: &LossInputs, metrics: Metrics) -> Result<LossOutput> {
    let n = per_example.size()[0];
    let weighted = match &inputs.weights {
        Some(w) => {
            ensure!(w.size() == [n], "`{loss}`: the weights must have shape [{n}], got {:?}", w.size());
            &per_example * w
        }
        None => per_example.shallow_clone(),
    };
    let (weighted, per_example, count) = match counted {
        Some(mask) => {
            let zeros = per_example.zeros_like();
            let count = mask.sum(Kind::Int64).int64_value(&[]);
            (weighted.where_self(mask, &zeros), per_example.where_self(mask, &zeros), count)
        }
        None => (weighted, per_example, n),
    };
    Ok(LossOutput {
        loss: weighted.sum(weighted.kind()) / count.max(1) as f64,
        per_example: per_example.detach(),
        count: usize::try_from(count)?,
        metrics,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_microbatch_without_counted_examples_has_zero_loss() {
        let inputs = LossInputs::binary(
            Sums::new(Tensor::from_slice(&[-1.0, -2.0]), None, Tensor::from_slice(&[1i64, 2])),
            Tensor::from_slice(&[false, false]),
        );
        let (_, desirable) = inputs.binary_rows("sft").unwrap();
        let out = finish("sft", Tensor::from_slice(&[1.0, 2.0]), Some(desirable), &inputs, Metrics::default()).unwrap();
        assert_eq!((out.loss.double_value(&[]), out.count), (0.0, 0));
        assert_eq!(Vec::<f64>::try_from(&out.per_example).unwrap(), [0.0, 0.0]);
    }

    #[test]
    fn empty_classes_have_no_mean() {
        let empty = Tensor::from_slice::<f64>(&[]);
        assert_eq!(mean_of(&empty), None);
        let m = Metrics::binary(&Tensor::from_slice(&[0.5, 1.5]), &Tensor::from_slice(&[true, true]));
        assert_eq!((m.rewards_chosen, m.rewards_rejected, m.margins), (Some(1.0), None, None));
    }
}
