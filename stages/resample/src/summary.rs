//! The `summary` output: what the stage kept, chose and dropped.

use serde::Serialize;

/// Row counts per class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ClassCounts {
    /// Rows labelled desirable.
    pub desirable: usize,
    /// Rows labelled undesirable.
    pub undesirable: usize,
}

/// Summary of one run, written as JSON and logged.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Rows of the input per class.
    pub input_rows: ClassCounts,
    /// Share of desirable rows kept.
    pub desirable_fraction: f64,
    /// Share of undesirable rows kept.
    pub undesirable_fraction: f64,
    /// Rows per class after subsetting (the n_D, n_U of Eq. 8).
    pub kept_rows: ClassCounts,
    /// λ_D, weight of desirable rows.
    pub lambda_d: f64,
    /// λ_U, weight of undesirable rows.
    pub lambda_u: f64,
    /// True when λ_D and λ_U were set by Eq. 8, false when given by the user.
    pub lambda_automatic: bool,
    /// λ_D·n_D / (λ_U·n_U) over the kept rows; Eq. 8 recommends [1, 4/3].
    pub weighted_ratio: f64,
    /// Rows per microbatch.
    pub microbatch_size: usize,
    /// Whether a short final microbatch was dropped.
    pub drop_last: bool,
    /// Number of microbatches in the plan.
    pub batches: usize,
    /// Rows per class in the plan.
    pub planned_rows: ClassCounts,
    /// Kept rows left out of the plan (the short final microbatch).
    pub dropped_rows: usize,
    /// Fewest desirable rows in one microbatch.
    pub desirable_per_batch_min: usize,
    /// Most desirable rows in one microbatch.
    pub desirable_per_batch_max: usize,
    /// Rows whose KL partner shares their prompt and could not be moved apart within the batch.
    pub matched_kl_pairs: usize,
    /// Seed of the subset and every shuffle.
    pub seed: u64,
    /// Warnings raised during the run (e.g. user-given λ outside Eq. 8's interval).
    pub warnings: Vec<String>,
}

impl Summary {
    /// Logs the summary on one line through `tracing`.
    pub fn log(&self) {
        tracing::info!(
            "kept {}/{} desirable and {}/{} undesirable rows; λ_D = {}, λ_U = {} ({}; λ_D·n_D/(λ_U·n_U) = {:.4}); \
             {} microbatches of {} with {}..{} desirable each, {} rows dropped, {} matched KL pairs left; seed {}",
            self.kept_rows.desirable,
            self.input_rows.desirable,
            self.kept_rows.undesirable,
            self.input_rows.undesirable,
            self.lambda_d,
            self.lambda_u,
            if self.lambda_automatic { "Eq. 8" } else { "given" },
            self.weighted_ratio,
            self.batches,
            self.microbatch_size,
            self.desirable_per_batch_min,
            self.desirable_per_batch_max,
            self.dropped_rows,
            self.matched_kl_pairs,
            self.seed,
        );
    }
}
