//! Gradient accumulation: the microbatch means of one optimizer step combined as a mean of
//! means weighted by example count, so that the step equals the same examples in one batch.

use anyhow::Result;
use tch::Tensor;

use super::{AllReduce, LossOutput};

/// Accumulates the microbatches of one optimizer step.
///
/// For each microbatch call [`Accumulator::backward`], which backpropagates `count_k · loss_k`;
/// then the accumulated gradients are multiplied by the factor of [`Accumulator::totals`],
/// `1 / Σ count_k` (by the optimizer, in the same multiplication as clipping). The gradients
/// are then those of `Σ_k count_k·loss_k / Σ_k count_k`, the loss of one big batch (summing the
/// microbatch losses instead would scale the learning rate by their number). The step's
/// example count need not be known in advance.
#[derive(Debug, Default)]
pub struct Accumulator {
    examples: usize,
    weighted_loss: f64,
}

impl Accumulator {
    /// An empty step.
    pub fn new() -> Accumulator {
        Accumulator::default()
    }

    /// Backpropagates one microbatch's loss, weighted by its example count (a microbatch of no
    /// examples contributes nothing).
    pub fn backward(&mut self, out: &LossOutput) -> Result<()> {
        if out.count == 0 {
            return Ok(());
        }
        let weighted = &out.loss * out.count as f64;
        self.weighted_loss += weighted.double_value(&[]);
        self.examples += out.count;
        weighted.f_backward()?;
        Ok(())
    }

    /// The examples accumulated so far.
    pub fn examples(&self) -> usize {
        self.examples
    }

    /// Sums the example count and weighted loss over the processes of a distributed run (a
    /// collective), so that the step's loss and gradient scale are those of the whole batch
    /// the processes ran together (their gradients are summed separately).
    pub fn all_reduce(&mut self, reduce: &dyn AllReduce) -> Result<()> {
        let totals = reduce.sum(&Tensor::from_slice(&[self.examples as f64, self.weighted_loss]))?;
        self.examples = totals.double_value(&[0]).round() as usize;
        self.weighted_loss = totals.double_value(&[1]);
        Ok(())
    }

    /// The step's loss and the factor its summed gradients are multiplied by (`None`, and a
    /// loss of 0, for a step without examples, whose gradients stay untouched).
    pub fn totals(&self) -> (f64, Option<f64>) {
        if self.examples == 0 {
            return (0.0, None);
        }
        let scale = 1.0 / self.examples as f64;
        (self.weighted_loss * scale, Some(scale))
    }
}
