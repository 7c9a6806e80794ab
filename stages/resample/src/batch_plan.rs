//! The stratified batch plan: kept rows in training order, cut into microbatches that each hold
//! both classes in proportion, with a KL partner for every row.
//!
//! Order of operations (all randomness from named [`Rng`] streams of the seed):
//! 1. shuffle each class;
//! 2. cut the N = n_D + n_U rows into microbatches of m; a short final batch is dropped when
//!    `drop_last` is set or when it has fewer than 2 rows (no mismatched KL pair possible);
//! 3. give every batch its class counts by cumulative proportional allocation
//!    (see [`desirable_counts`]) and fill it from the front of each shuffled class;
//! 4. shuffle each batch, pair row i with row (i+1) mod m ([`kl_pairs`]) after moving rows so
//!    that as few partners as possible share a prompt.

use anyhow::{bail, Result};
use haloflow::records::{BinaryRow, PlanRow};

use crate::kl_pairs;
use crate::rng::Rng;

/// How to cut the kept rows into microbatches.
#[derive(Debug, Clone, Copy)]
pub struct PlanOptions {
    /// Rows per microbatch (m ≥ 2).
    pub microbatch_size: usize,
    /// Drop a final batch of fewer than m rows instead of keeping it.
    pub drop_last: bool,
    /// Seed of every shuffle.
    pub seed: u64,
}

/// A batch plan and what it took to build it.
#[derive(Debug, Clone)]
pub struct BatchPlan {
    /// Plan rows in training order; the rows of a batch are contiguous.
    pub rows: Vec<PlanRow>,
    /// Number of desirable rows in each microbatch, in batch order.
    pub desirable_per_batch: Vec<usize>,
    /// Desirable rows left out of the plan (the dropped final batch's share).
    pub dropped_desirable: usize,
    /// Undesirable rows left out of the plan.
    pub dropped_undesirable: usize,
    /// Rows whose KL partner shares their prompt although the batch was reordered to avoid it.
    pub matched_kl_pairs: usize,
}

/// Refuses microbatches too small for KTO's mismatched KL pair.
pub fn check_microbatch_size(m: usize) -> Result<()> {
    if m < 2 {
        bail!(
            "--microbatch-size must be at least 2, got {m}: KTO's mismatched KL pair needs m ≥ 2 \
             (with m = 1 a row would be its own partner, the matched pair)"
        );
    }
    Ok(())
}

/// Sizes of the microbatches for `n` rows in batches of `m`: full batches, then the remainder
/// if it is kept (`drop_last` off and at least 2 rows).
fn batch_sizes(n: usize, m: usize, drop_last: bool) -> Vec<usize> {
    let mut sizes = vec![m; n / m];
    let rest = n % m;
    if !drop_last && rest >= 2 {
        sizes.push(rest);
    }
    sizes
}

/// How many of the `kept` planned rows are desirable when the final short batch is dropped:
/// the proportional share `round(kept·n_d/N)`, moved if needed so that each class keeps at least
/// `min(its count, batches)` rows (enough for one per batch). Equals `n_d` when nothing is dropped.
fn kept_desirable(n_d: usize, n_u: usize, kept: usize, batches: usize) -> usize {
    let n = (n_d + n_u) as u128;
    let proportional = ((2 * kept as u128 * n_d as u128 + n) / (2 * n)) as usize;
    proportional.clamp(n_d.min(batches), kept - n_u.min(batches))
}

/// Desirable rows per batch of the given sizes for `k_d` desirable and `k_u` undesirable rows
/// (`k_d + k_u` = sum of sizes), by cumulative proportional allocation: the smaller class c gets
/// `floor(end_b·k_c/K) − floor(start_b·k_c/K)` rows in batch b, the other class the rest.
///
/// Every batch's share differs from another full batch's by at most 1. Applying the floors to the
/// smaller class (desirable on ties) guarantees the last batch, which may be short, at least one
/// row of it; so every batch holds both classes when each class has at least one row per batch.
fn desirable_counts(k_d: usize, k_u: usize, sizes: &[usize]) -> Vec<usize> {
    let total = (k_d + k_u) as u128;
    let smaller = k_d.min(k_u) as u128;
    let mut start = 0u128;
    sizes
        .iter()
        .map(|&size| {
            let end = start + size as u128;
            let share = (end * smaller / total - start * smaller / total) as usize;
            start = end;
            if k_d <= k_u {
                share
            } else {
                size - share
            }
        })
        .collect()
}

/// Builds the plan from the kept rows of each class. Fails for m < 2 and when not even one
/// microbatch can be formed.
pub fn build(
    mut desirable: Vec<BinaryRow>,
    mut undesirable: Vec<BinaryRow>,
    opts: &PlanOptions,
) -> Result<BatchPlan> {
    let m = opts.microbatch_size;
    check_microbatch_size(m)?;
    let (n_d, n_u) = (desirable.len(), undesirable.len());
    let sizes = batch_sizes(n_d + n_u, m, opts.drop_last);
    if sizes.is_empty() {
        bail!(
            "only {} rows ({n_d} desirable, {n_u} undesirable) for microbatches of {m}: not one \
             microbatch can be formed; lower --microbatch-size{}",
            n_d + n_u,
            if opts.drop_last { " or pass --drop-last false" } else { "" }
        );
    }
    Rng::stream(opts.seed, "order/desirable").shuffle(&mut desirable);
    Rng::stream(opts.seed, "order/undesirable").shuffle(&mut undesirable);
    let kept: usize = sizes.iter().sum();
    let k_d = kept_desirable(n_d, n_u, kept, sizes.len());
    let counts = desirable_counts(k_d, kept - k_d, &sizes);

    let mut batch_rng = Rng::stream(opts.seed, "batch");
    let (mut des, mut und) = (desirable.into_iter(), undesirable.into_iter());
    let mut rows = Vec::with_capacity(kept);
    let mut matched_kl_pairs = 0;
    for (b, (&size, &d)) in sizes.iter().zip(&counts).enumerate() {
        let mut batch: Vec<BinaryRow> = des.by_ref().take(d).chain(und.by_ref().take(size - d)).collect();
        batch_rng.shuffle(&mut batch);
        matched_kl_pairs += kl_pairs::separate_prompts(&mut batch);
        rows.extend(kl_pairs::pair_up(batch, b as i64));
    }
    Ok(BatchPlan {
        rows,
        desirable_per_batch: counts,
        dropped_desirable: des.len(),
        dropped_undesirable: und.len(),
        matched_kl_pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rows::row;

    fn opts(m: usize, drop_last: bool, seed: u64) -> PlanOptions {
        PlanOptions { microbatch_size: m, drop_last, seed }
    }

    /// `n_d` desirable rows then `n_u` undesirable rows, each with its own prompt.
    fn classes(n_d: usize, n_u: usize) -> (Vec<BinaryRow>, Vec<BinaryRow>) {
        ((0..n_d).map(|i| row(i, i, true)).collect(), (n_d..n_d + n_u).map(|i| row(i, i, false)).collect())
    }

    fn plan(n_d: usize, n_u: usize, o: PlanOptions) -> BatchPlan {
        let (d, u) = classes(n_d, n_u);
        build(d, u, &o).unwrap()
    }

    /// Rows of each batch, checked to be contiguous and numbered from 0.
    fn batches(plan: &BatchPlan) -> Vec<Vec<&PlanRow>> {
        let mut out: Vec<Vec<&PlanRow>> = Vec::new();
        for r in &plan.rows {
            if out.len() as i64 == r.batch {
                out.push(Vec::new());
            }
            assert_eq!(r.batch, out.len() as i64 - 1, "batches not contiguous");
            out.last_mut().unwrap().push(r);
        }
        out
    }

    #[test]
    fn microbatch_size_below_two_is_refused() {
        for m in [0, 1] {
            let (d, u) = classes(4, 4);
            let err = build(d, u, &opts(m, true, 0)).unwrap_err().to_string();
            assert!(err.contains("--microbatch-size") && err.contains("m ≥ 2"), "{err}");
        }
    }

    #[test]
    fn every_batch_holds_both_classes_evenly() {
        for n_d in 1..=24 {
            for n_u in 1..=24 {
                for m in 2..=7 {
                    for drop_last in [true, false] {
                        let sizes = batch_sizes(n_d + n_u, m, drop_last);
                        if sizes.is_empty() {
                            continue;
                        }
                        let kept: usize = sizes.iter().sum();
                        let k_d = kept_desirable(n_d, n_u, kept, sizes.len());
                        let counts = desirable_counts(k_d, kept - k_d, &sizes);
                        let case = format!("n_d {n_d}, n_u {n_u}, m {m}, drop_last {drop_last}");
                        assert!(k_d <= n_d && kept - k_d <= n_u, "{case}");
                        assert_eq!(counts.iter().sum::<usize>(), k_d, "{case}");
                        if n_d >= sizes.len() && n_u >= sizes.len() {
                            for (b, (&d, &s)) in counts.iter().zip(&sizes).enumerate() {
                                assert!(d >= 1 && s - d >= 1, "{case}: batch {b} has {d} of {s} desirable");
                            }
                        }
                        let full: Vec<usize> =
                            counts.iter().zip(&sizes).filter(|(_, &s)| s == m).map(|(&d, _)| d).collect();
                        let (lo, hi) = (full.iter().min(), full.iter().max());
                        if let (Some(lo), Some(hi)) = (lo, hi) {
                            assert!(hi - lo <= 1, "{case}: full batches hold {lo}..{hi} desirable");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn plan_batches_match_the_allocation() {
        let p = plan(20, 80, opts(8, true, 4));
        let bs = batches(&p);
        assert_eq!(bs.len(), 12);
        for (b, rows) in bs.iter().enumerate() {
            assert_eq!(rows.len(), 8);
            let d = rows.iter().filter(|r| r.example.label).count();
            assert_eq!(d, p.desirable_per_batch[b]);
            assert!((1..8).contains(&d), "batch {b}: {d} desirable");
        }
        let planned_d: usize = p.desirable_per_batch.iter().sum();
        assert_eq!(planned_d + p.dropped_desirable, 20);
        assert_eq!(p.rows.len() + p.dropped_desirable + p.dropped_undesirable, 100);
    }

    #[test]
    fn kl_partner_is_next_row_of_the_same_batch() {
        for m in [2, 3, 5, 8] {
            let p = plan(13, 17, opts(m, false, 9));
            for rows in batches(&p) {
                for (i, r) in rows.iter().enumerate() {
                    let partner = rows[(i + 1) % rows.len()];
                    assert_eq!(r.kl_example_id, partner.example.example_id);
                    assert_eq!(r.kl_completion, partner.example.completion);
                    assert_ne!(r.kl_example_id, r.example.example_id, "m = {m}: own partner");
                }
            }
        }
    }

    #[test]
    fn drop_last_drops_and_counts_the_short_batch() {
        // 23 rows in batches of 4: 5 full batches and a remainder of 3.
        let p = plan(11, 12, opts(4, true, 1));
        assert_eq!((p.rows.len(), batches(&p).len()), (20, 5));
        assert_eq!(p.dropped_desirable + p.dropped_undesirable, 3);
        let p = plan(11, 12, opts(4, false, 1));
        assert_eq!((p.rows.len(), batches(&p).len()), (23, 6));
        assert_eq!(p.dropped_desirable + p.dropped_undesirable, 0);
        assert_eq!(batches(&p).last().unwrap().len(), 3);
        // A remainder of one row cannot form a KL pair: dropped even without drop_last.
        let p = plan(10, 11, opts(4, false, 1));
        assert_eq!((p.rows.len(), p.dropped_desirable + p.dropped_undesirable), (20, 1));
    }

    #[test]
    fn too_few_rows_for_one_batch_are_refused() {
        let (d, u) = classes(2, 1);
        let err = build(d, u, &opts(4, true, 0)).unwrap_err().to_string();
        assert!(err.contains("only 3 rows") && err.contains("--drop-last false"), "{err}");
        let (d, u) = classes(2, 1);
        assert_eq!(build(d, u, &opts(4, false, 0)).unwrap().rows.len(), 3);
    }

    #[test]
    fn same_seed_same_plan_other_seed_other_order() {
        let a = plan(30, 50, opts(8, true, 5));
        assert_eq!(a.rows, plan(30, 50, opts(8, true, 5)).rows);
        let b = plan(30, 50, opts(8, true, 6));
        let ids = |p: &BatchPlan| p.rows.iter().map(|r| r.example.example_id.clone()).collect::<Vec<_>>();
        assert_ne!(ids(&a), ids(&b));
        assert_eq!(a.desirable_per_batch, b.desirable_per_batch);
    }

    #[test]
    fn unpaired_halves_do_not_become_kl_partners() {
        // 8 preference pairs unpaired: each prompt has one desirable and one undesirable row.
        let d: Vec<_> = (0..8).map(|i| row(i, i, true)).collect();
        let u: Vec<_> = (0..8).map(|i| row(8 + i, i, false)).collect();
        for seed in 0..50 {
            let p = build(d.clone(), u.clone(), &opts(4, true, seed)).unwrap();
            assert_eq!(p.matched_kl_pairs, 0, "seed {seed}");
            let by_id: std::collections::HashMap<_, _> =
                p.rows.iter().map(|r| (r.example.example_id.clone(), r.example.prompt_id.clone())).collect();
            assert!(p.rows.iter().all(|r| by_id[&r.kl_example_id] != r.example.prompt_id));
        }
    }
}
