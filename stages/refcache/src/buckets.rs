//! Length bucketing: sequences sorted by length, cut into fixed chunks (the unit of resumption)
//! and, inside a chunk, into batches whose padded size fits a token budget.

/// Indices of `lengths` sorted longest first (ties by index, so the order is deterministic).
pub fn by_length(lengths: &[usize]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    order.sort_by(|&a, &b| lengths[b].cmp(&lengths[a]).then(a.cmp(&b)));
    order
}

/// Splits a run of sequences (sorted longest first) into batches whose padded size
/// `rows × longest` stays within `budget` (a batch always takes at least one sequence).
pub fn batches(sorted: &[usize], lengths: &[usize], budget: usize) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for &i in sorted {
        let longest = current.first().map(|&f| lengths[f]).unwrap_or(lengths[i]);
        if !current.is_empty() && (current.len() + 1) * longest > budget {
            out.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_fit_the_budget_and_cover_everything() {
        let lengths = [5, 50, 7, 50, 3, 20, 20, 9];
        let order = by_length(&lengths);
        assert_eq!(order, [1, 3, 5, 6, 7, 2, 0, 4]);
        let b = batches(&order, &lengths, 100);
        for batch in &b {
            let longest = batch.iter().map(|&i| lengths[i]).max().unwrap();
            assert!(batch.len() == 1 || batch.len() * longest <= 100);
        }
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..lengths.len()).collect::<Vec<_>>());
        // A sequence longer than the budget still gets a batch of its own.
        assert_eq!(batches(&[0], &[500], 100), vec![vec![0]]);
    }

    #[test]
    fn sorting_reduces_padding() {
        let lengths: Vec<usize> = (0..64).map(|i| 10 + (i * 37) % 200).collect();
        let padded = |bs: &[Vec<usize>]| -> usize { bs.iter().map(|b| b.len() * b.iter().map(|&i| lengths[i]).max().unwrap()).sum() };
        let sorted = batches(&by_length(&lengths), &lengths, 1024);
        let naive: Vec<Vec<usize>> = (0..64).collect::<Vec<_>>().chunks(8).map(|c| c.to_vec()).collect();
        assert!(padded(&sorted) < padded(&naive));
    }
}
