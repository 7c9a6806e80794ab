//! Training data: tokenized rows grouped into microbatches, a held-out split, and the order of
//! microbatches in each epoch.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use haloflow_ml::dataset::{DataKind, EncodedRow};

/// Microbatches of row indices (into the encoded rows), training and held-out.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Training microbatches in plan order.
    pub train: Vec<Vec<usize>>,
    /// Held-out microbatches.
    pub eval: Vec<Vec<usize>>,
}

/// Groups rows into microbatches: a `plan` by its `batch` column (the stratified batches of
/// `resample`, KL partners inside), a `paired` table in consecutive chunks of `microbatch_size`.
/// The last `eval_batches` microbatches are held out. `batch_of` gives each encoded row's plan
/// batch (ignored for paired data).
pub fn split(kind: DataKind, rows: &[EncodedRow], batch_of: &BTreeMap<String, i64>, microbatch_size: usize, eval_batches: usize) -> Result<Split> {
    let mut batches: Vec<Vec<usize>> = match kind {
        DataKind::Plan => {
            let mut groups: Vec<(i64, Vec<usize>)> = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                let b = batch_of[&row.id];
                match groups.last_mut() {
                    Some((last, members)) if *last == b => members.push(i),
                    _ => groups.push((b, vec![i])),
                }
            }
            groups.into_iter().map(|(_, m)| m).collect()
        }
        DataKind::Paired => {
            if microbatch_size == 0 {
                bail!("microbatch_size must be at least 1");
            }
            (0..rows.len()).collect::<Vec<_>>().chunks(microbatch_size).map(|c| c.to_vec()).collect()
        }
    };
    if eval_batches >= batches.len() {
        bail!("eval_batches ({eval_batches}) leaves no training microbatch out of {}", batches.len());
    }
    let eval = batches.split_off(batches.len() - eval_batches);
    Ok(Split { train: batches, eval })
}

/// The order of training microbatches in `epoch`: the plan order first, then a seeded shuffle.
pub fn epoch_order(n: usize, epoch: usize, seed: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if epoch == 0 {
        return order;
    }
    let mut state = seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    for i in (1..n).rev() {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        order.swap(i, (z % (i as u64 + 1)) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use haloflow_ml::logprobs::Sequence;

    fn rows(n: usize) -> Vec<EncodedRow> {
        let s = Sequence { ids: vec![1, 2, 3], completion_start: 2 };
        (0..n).map(|i| EncodedRow { id: format!("e{i}"), seqs: [s.clone(), s.clone()] }).collect()
    }

    #[test]
    fn plan_batches_follow_the_batch_column_and_hold_out_the_tail() {
        let r = rows(7);
        let batch_of: BTreeMap<String, i64> = (0..7).map(|i| (format!("e{i}"), (i / 3) as i64)).collect();
        let s = split(DataKind::Plan, &r, &batch_of, 0, 1).unwrap();
        assert_eq!(s.train, vec![vec![0, 1, 2], vec![3, 4, 5]]);
        assert_eq!(s.eval, vec![vec![6]]);
        assert!(split(DataKind::Plan, &r, &batch_of, 0, 3).is_err());
    }

    #[test]
    fn paired_chunks_and_epoch_orders() {
        let s = split(DataKind::Paired, &rows(5), &BTreeMap::new(), 2, 0).unwrap();
        assert_eq!(s.train, vec![vec![0, 1], vec![2, 3], vec![4]]);
        assert_eq!(epoch_order(5, 0, 1), [0, 1, 2, 3, 4]);
        let e1 = epoch_order(50, 1, 1);
        assert_ne!(e1, epoch_order(50, 2, 1));
        assert_eq!(e1, epoch_order(50, 1, 1));
        let mut sorted = e1.clone();
        sorted.sort();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }
}
