//! Length bucketing: rows sorted by size, cut into fixed chunks (the unit of resumption) and,
//! inside a chunk, into batches whose padded size fits a token budget.

/// Indices sorted by `key` descending (ties by index, so the order is deterministic).
pub fn sorted_desc<K: Ord>(n: usize, key: impl Fn(usize) -> K) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| key(b).cmp(&key(a)).then(a.cmp(&b)));
    order
}

/// Splits a run of indices into consecutive batches whose padded size `cost(batch)` stays
/// within `budget` (a batch always takes at least one index).
pub fn batches(sorted: &[usize], budget: usize, cost: impl Fn(&[usize]) -> usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for &i in sorted {
        current.push(i);
        if current.len() > 1 && cost(&current) > budget {
            current.pop();
            out.push(std::mem::replace(&mut current, vec![i]));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn padded(lengths: &[usize]) -> impl Fn(&[usize]) -> usize + '_ {
        move |b: &[usize]| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap_or(0)
    }

    #[test]
    fn batches_fit_the_budget_and_cover_everything() {
        let lengths = [5, 50, 7, 50, 3, 20, 20, 9];
        let order = sorted_desc(lengths.len(), |i| lengths[i]);
        assert_eq!(order, [1, 3, 5, 6, 7, 2, 0, 4]);
        let b = batches(&order, 100, padded(&lengths));
        for batch in &b {
            assert!(batch.len() == 1 || padded(&lengths)(batch) <= 100);
        }
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        // An item larger than the budget still gets a batch of its own.
        assert_eq!(batches(&[0], 100, padded(&[500])), vec![vec![0]]);
    }

    #[test]
    fn sorting_reduces_padding() {
        let lengths: Vec<usize> = (0..64).map(|i| 10 + (i * 37) % 200).collect();
        let total = |bs: &[Vec<usize>]| -> usize { bs.iter().map(|b| padded(&lengths)(b)).sum() };
        let sorted = batches(&sorted_desc(64, |i| lengths[i]), 1024, padded(&lengths));
        let naive: Vec<Vec<usize>> = (0..64).collect::<Vec<_>>().chunks(8).map(|c| c.to_vec()).collect();
        assert!(total(&sorted) < total(&naive));
    }
}
