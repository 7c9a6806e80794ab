//! KTO (Ethayarajh et al., 2024), binary feedback:
//!
//! ```text
//! z0          = max(0, mean_i [S_pol(y'_i|x_i) − S_ref(y'_i|x_i)])   (no gradient)
//! desirable   = λ_D · (1 − σ(β·(r − z0)))
//! undesirable = λ_U · (1 − σ(β·(z0 − r)))
//! ```
//!
//! averaged over the rows of the microbatch (which may hold one class only). `y'_i` is row
//! i's mismatched KL partner `y_{(i+1) mod m}`; a microbatch of m < 2 rows is refused, since
//! the "mismatched" pair of a single row is its matched one. The KL mean is taken over a whole
//! optimizer step when the trainer gives one ([`Halo::step_reference_point`]), else over the
//! microbatch; with several processes it is all-reduced before the clamp.

use std::sync::Arc;

use anyhow::{ensure, Context, Result};
use tch::{Kind, Tensor};

use super::params::{Bound, Params};
use super::{finish, AllReduce, DataNeed, Halo, KlPartners, LossInputs, LossOutput, Metrics, SingleProcess};

/// The KTO loss.
pub struct Kto {
    /// β (default 0.1).
    pub beta: f64,
    /// λ_D when set explicitly; otherwise the inputs' (the batch plan's), else 1.
    pub lambda_d: Option<f64>,
    /// λ_U when set explicitly; otherwise the inputs' (the batch plan's), else 1.
    pub lambda_u: Option<f64>,
    reduce: Arc<dyn AllReduce>,
}

impl Kto {
    /// KTO with β, λ_D and λ_U left to the batch plan, in a single process.
    pub fn new(beta: f64) -> Kto {
        Kto { beta, lambda_d: None, lambda_u: None, reduce: Arc::new(SingleProcess) }
    }

    pub(crate) fn from_params(p: &Params) -> Result<Kto> {
        Ok(Kto {
            lambda_d: p.optional("lambda_d", Bound::Positive)?,
            lambda_u: p.optional("lambda_u", Bound::Positive)?,
            ..Kto::new(p.number("beta", 0.1, Bound::Positive)?)
        })
    }

    /// The reference point z0 of a microbatch's KL partners: a detached scalar computed under
    /// no-grad, the mean all-reduced over processes, then clamped at 0.
    pub fn reference_point(&self, kl: &KlPartners) -> Result<Tensor> {
        self.pooled_reference_point(&[kl])
    }

    /// z0 of the KL partners of several microbatches: their (count, sum) all-reduced, the
    /// mean clamped at 0 (clamping per process and averaging would be biased).
    pub fn pooled_reference_point(&self, kls: &[&KlPartners]) -> Result<Tensor> {
        ensure!(!kls.is_empty(), "`kto`: no KL partners to take the reference point of");
        tch::no_grad(|| {
            let diffs: Vec<Tensor> = kls.iter().map(|kl| kl.policy.detach() - kl.reference.detach()).collect();
            let kind = diffs[0].kind();
            let count: i64 = diffs.iter().map(|d| d.numel() as i64).sum();
            let sum = diffs.iter().map(|d| d.sum(Kind::Double)).reduce(|a, b| a + b).expect("non-empty");
            let stats = Tensor::stack(&[sum.ones_like() * count as f64, sum], 0);
            let total = self.reduce.sum(&stats)?;
            Ok((total.get(1) / total.get(0)).clamp_min(0.0).to_kind(kind))
        })
    }
}

impl Halo for Kto {
    fn name(&self) -> &'static str {
        "kto"
    }

    fn data(&self) -> DataNeed {
        DataNeed::Binary
    }

    fn needs_reference(&self) -> bool {
        true
    }

    fn min_rows_per_microbatch(&self) -> usize {
        2
    }

    fn needs_kl_partners(&self) -> bool {
        true
    }

    fn step_reference_point(&self, kl: &[&KlPartners]) -> Result<Option<Tensor>> {
        self.pooled_reference_point(kl).map(Some)
    }

    fn loss(&self, inputs: &LossInputs) -> Result<LossOutput> {
        let name = self.name();
        let (rows, desirable) = inputs.binary_rows(name)?;
        let m = desirable.numel();
        ensure!(m >= 2, "`kto` needs microbatches of at least 2 rows, got {m}: a single row's mismatched KL pair is its matched one");
        let kl = inputs.kl.as_ref().context("`kto` needs the KL partners (kl_completion) of the rows; none were given")?;
        for (t, what) in [(&kl.policy, "policy"), (&kl.reference, "reference")] {
            ensure!(t.size() == [m as i64], "`kto`: the KL partners' {what} log-probs must have shape [{m}], got {:?}", t.size());
        }
        let z0 = match &inputs.reference_point {
            Some(z0) => z0.shallow_clone(),
            None => self.reference_point(kl)?,
        };
        let r = rows.reward(name, "rows")?;
        let lambda_d = self.lambda_d.or(inputs.lambda_d).unwrap_or(1.0);
        let lambda_u = self.lambda_u.or(inputs.lambda_u).unwrap_or(1.0);
        // 1 − σ(x) = σ(−x).
        let shifted = (&r - &z0) * self.beta;
        let per_row = ((-&shifted).sigmoid() * lambda_d).where_self(desirable, &(shifted.sigmoid() * lambda_u));
        let metrics = Metrics { kl: Some(z0.double_value(&[])), ..Metrics::binary(&(r * self.beta), desirable) };
        finish(name, per_row, None, inputs, metrics)
    }

    fn set_all_reduce(&mut self, reduce: Arc<dyn AllReduce>) {
        self.reduce = reduce;
    }
}
