//! KL partners for KTO's reference point z0 (spec `LOSSES.md`): row i of a microbatch of m rows
//! is paired with the completion of row `(i+1) mod m`, a mismatched (prompt, completion) pair.
//!
//! The pairing is a rotation, never a reversal: reversing a batch of odd size pairs the middle
//! row with itself (see the spec's known pitfalls). A rotation never does that for m ≥ 2, but it
//! can still pair two rows of the same prompt (e.g. the two halves of an unpaired preference
//! pair side by side), which makes the "mismatched" pair a matched one. [`separate_prompts`]
//! reorders the batch to avoid that wherever the batch's prompts allow it.

use std::collections::HashMap;

use haloflow::records::{BinaryRow, PlanRow};

/// Whether the row at `i` and its partner at `(i+1) mod m` share a prompt.
fn matched(rows: &[BinaryRow], i: usize) -> bool {
    rows[i].prompt_id == rows[(i + 1) % rows.len()].prompt_id
}

/// Number of rows whose KL partner shares their prompt.
fn matched_pairs(rows: &[BinaryRow]) -> usize {
    (0..rows.len()).filter(|&i| matched(rows, i)).count()
}

/// Matched pairs among the partner links that start at the given positions.
fn matched_at(rows: &[BinaryRow], links: &[usize]) -> usize {
    links.iter().filter(|&&i| matched(rows, i)).count()
}

/// The partner links touched by swapping positions `a` and `b` of a batch of `m` rows: the
/// links into and out of each (listed once).
fn links_touched(a: usize, b: usize, m: usize) -> Vec<usize> {
    let mut links = vec![(a + m - 1) % m, a, (b + m - 1) % m, b];
    links.sort_unstable();
    links.dedup();
    links
}

/// Fewest matched links any cyclic order of `rows` can have: with g rows of the most common
/// prompt, at least `g − (m − g)` of them follow one of their own (0 if g ≤ m/2).
fn lower_bound(rows: &[BinaryRow]) -> usize {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for row in rows {
        *counts.entry(row.prompt_id.as_str()).or_default() += 1;
    }
    let largest = counts.values().copied().max().unwrap_or(0);
    (2 * largest).saturating_sub(rows.len())
}

/// Local search: while some link is matched, swap one of its ends with another row if that
/// lowers the number of matched links. Changes the order little, but can stop short of the best.
fn swap_apart(rows: &mut [BinaryRow]) {
    let m = rows.len();
    let mut improved = true;
    while improved {
        improved = false;
        for link in 0..m {
            if !matched(rows, link) {
                continue;
            }
            'ends: for a in [(link + 1) % m, link] {
                for b in (1..m).map(|k| (a + k) % m) {
                    let links = links_touched(a, b, m);
                    let before = matched_at(rows, &links);
                    rows.swap(a, b);
                    if matched_at(rows, &links) < before {
                        improved = true;
                        break 'ends;
                    }
                    rows.swap(a, b);
                }
            }
        }
    }
}

/// Rebuilds the order by prompt groups, largest first (ties in order of appearance), filling
/// positions 0, 2, 4, … and then 1, 3, 5, …: this reaches [`lower_bound`] in every case.
fn interleave(rows: &mut Vec<BinaryRow>) {
    let m = rows.len();
    let mut groups: Vec<Vec<BinaryRow>> = Vec::new();
    let mut group_of: HashMap<String, usize> = HashMap::new();
    for row in rows.drain(..) {
        let g = *group_of.entry(row.prompt_id.clone()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(row);
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));
    let mut slots: Vec<Option<BinaryRow>> = (0..m).map(|_| None).collect();
    let positions = (0..m).step_by(2).chain((1..m).step_by(2));
    for (position, row) in positions.zip(groups.into_iter().flatten()) {
        slots[position] = Some(row);
    }
    rows.extend(slots.into_iter().map(|slot| slot.expect("every position is filled once")));
}

/// Reorders a microbatch so that as few rows as possible have a KL partner with their own
/// prompt, and returns how many remain (the unavoidable ones, [`lower_bound`]). An order without
/// such rows is left as is; otherwise rows are first swapped apart, and only if that stops short
/// of the bound is the batch rebuilt by [`interleave`]. Deterministic.
pub fn separate_prompts(rows: &mut Vec<BinaryRow>) -> usize {
    if rows.len() < 2 || matched_pairs(rows) == 0 {
        return 0;
    }
    swap_apart(rows);
    if matched_pairs(rows) > lower_bound(rows) {
        interleave(rows);
    }
    matched_pairs(rows)
}

/// Turns the rows of microbatch `batch` into plan rows, row i taking the completion of row
/// `(i+1) mod m` as its KL partner. The batch must hold at least 2 rows.
pub fn pair_up(rows: Vec<BinaryRow>, batch: i64) -> Vec<PlanRow> {
    assert!(rows.len() >= 2, "a KL pair needs at least 2 rows, got {}", rows.len());
    let partners: Vec<(String, String)> = (0..rows.len())
        .map(|i| {
            let partner = &rows[(i + 1) % rows.len()];
            (partner.example_id.clone(), partner.completion.clone())
        })
        .collect();
    rows.into_iter()
        .zip(partners)
        .map(|(example, (kl_example_id, kl_completion))| PlanRow {
            example,
            batch,
            kl_example_id,
            kl_completion,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::test_rows::row;

    /// Random batches of 2..=12 rows over a few prompts.
    fn random_batches(seed: u64, count: usize) -> Vec<Vec<BinaryRow>> {
        let mut rng = Rng::new(seed);
        (0..count)
            .map(|_| {
                let m = 2 + rng.below(11) as usize;
                let prompts = 1 + rng.below(m as u64);
                (0..m).map(|i| row(i, rng.below(prompts) as usize, i % 2 == 0)).collect()
            })
            .collect()
    }

    fn sorted_ids(rows: &[BinaryRow]) -> Vec<String> {
        let mut ids: Vec<_> = rows.iter().map(|r| r.example_id.clone()).collect();
        ids.sort();
        ids
    }

    #[test]
    fn partner_of_row_i_is_row_i_plus_one_mod_m() {
        for m in 2..=9 {
            let rows: Vec<_> = (0..m).map(|i| row(i, i, i % 2 == 0)).collect();
            let plan = pair_up(rows.clone(), 3);
            for (i, p) in plan.iter().enumerate() {
                let partner = &rows[(i + 1) % m];
                assert_eq!(p.kl_example_id, partner.example_id, "m = {m}, row {i}");
                assert_eq!(p.kl_completion, partner.completion);
                assert_ne!(p.kl_example_id, p.example.example_id, "m = {m}: row {i} is its own partner");
                assert_eq!(p.batch, 3);
            }
        }
    }

    #[test]
    fn adjacent_halves_of_a_pair_are_separated() {
        // Prompts 0,0,1,1,2,2: every pair sits side by side.
        let mut rows: Vec<_> = (0..6).map(|i| row(i, i / 2, i % 2 == 0)).collect();
        assert_eq!(matched_pairs(&rows), 3);
        let before = rows.clone();
        assert_eq!(separate_prompts(&mut rows), 0);
        assert_eq!(sorted_ids(&rows), sorted_ids(&before));
    }

    #[test]
    fn clean_order_is_left_alone() {
        let mut rows: Vec<_> = (0..5).map(|i| row(i, i, true)).collect();
        let before = rows.clone();
        assert_eq!(separate_prompts(&mut rows), 0);
        assert_eq!(rows, before);
    }

    #[test]
    fn reaches_the_lower_bound_on_random_batches() {
        // With g rows of the most common prompt in a batch of m, at least max(0, 2g − m) links
        // are matched in any cyclic order; the fix-up must get there.
        for (trial, batch) in random_batches(11, 3000).into_iter().enumerate() {
            let bound = lower_bound(&batch);
            let mut rows = batch.clone();
            let left = separate_prompts(&mut rows);
            assert_eq!(left, matched_pairs(&rows));
            assert_eq!(
                left,
                bound,
                "trial {trial}: {:?}",
                batch.iter().map(|r| &r.prompt_id).collect::<Vec<_>>()
            );
            assert_eq!(sorted_ids(&rows), sorted_ids(&batch), "rows were lost or duplicated");
        }
    }

    #[test]
    fn interleave_alone_reaches_the_lower_bound() {
        for batch in random_batches(12, 3000) {
            let mut rows = batch.clone();
            interleave(&mut rows);
            assert_eq!(matched_pairs(&rows), lower_bound(&batch));
            assert_eq!(sorted_ids(&rows), sorted_ids(&batch));
        }
    }

    #[test]
    fn two_rows_of_one_prompt_stay_matched() {
        let mut rows = vec![row(0, 0, true), row(1, 0, false)];
        assert_eq!(separate_prompts(&mut rows), 2);
    }
}
