//! The paired → binary conversion and its conflict accounting.

use std::collections::HashMap;

use anyhow::{bail, Result};
use haloflow::records::{BinaryRow, PairedRow};
use serde::Serialize;

/// What `unpair` did, written as the stage's summary.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    /// Pairs read.
    pub pairs: usize,
    /// Binary rows written.
    pub rows_written: usize,
    /// Desirable rows written.
    pub desirable: usize,
    /// Undesirable rows written.
    pub undesirable: usize,
    /// (prompt, completion) groups that occur with both labels.
    pub conflicting_groups: usize,
    /// Rows belonging to those groups.
    pub rows_in_conflicts: usize,
    /// Rows dropped because of conflicts (only with `drop_conflicts`).
    pub rows_dropped: usize,
    /// Rows repeating an identical (prompt, completion, label) (kept).
    pub duplicate_rows: usize,
}

/// Splits each pair into a desirable and an undesirable row (ids `PAIR_ID:d` / `PAIR_ID:u`).
pub fn unpair(pairs: &[PairedRow], drop_conflicts: bool) -> Result<(Vec<BinaryRow>, Summary)> {
    if pairs.is_empty() {
        bail!("the paired input holds no rows");
    }
    let mut rows = Vec::with_capacity(pairs.len() * 2);
    for pair in pairs {
        for (label, completion, suffix) in [(true, &pair.chosen, "d"), (false, &pair.rejected, "u")] {
            rows.push(BinaryRow {
                example_id: format!("{}:{suffix}", pair.pair_id),
                prompt_id: pair.prompt_id.clone(),
                prompt: pair.prompt.clone(),
                completion: completion.clone(),
                label,
                weight: 1.0,
                source: pair.source.clone(),
            });
        }
    }
    // Group rows by (prompt, completion) and count the labels each group carries.
    let mut groups: HashMap<(&str, &str), [usize; 2]> = HashMap::new();
    for row in &rows {
        groups.entry((row.prompt_id.as_str(), row.completion.as_str())).or_default()[row.label as usize] += 1;
    }
    let conflicting: Vec<(&str, &str)> =
        groups.iter().filter(|(_, c)| c[0] > 0 && c[1] > 0).map(|(k, _)| *k).collect();
    let rows_in_conflicts: usize = conflicting.iter().map(|k| groups[k].iter().sum::<usize>()).sum();
    let duplicate_rows: usize = groups.values().map(|c| c[0].saturating_sub(1) + c[1].saturating_sub(1)).sum();
    let conflict_set: std::collections::HashSet<(String, String)> =
        conflicting.iter().map(|(p, c)| (p.to_string(), c.to_string())).collect();
    let before = rows.len();
    if drop_conflicts {
        rows.retain(|r| !conflict_set.contains(&(r.prompt_id.clone(), r.completion.clone())));
    }
    if rows.is_empty() {
        bail!("every row conflicts: nothing left after --drop-conflicts");
    }
    let desirable = rows.iter().filter(|r| r.label).count();
    let summary = Summary {
        pairs: pairs.len(),
        rows_written: rows.len(),
        desirable,
        undesirable: rows.len() - desirable,
        conflicting_groups: conflict_set.len(),
        rows_in_conflicts,
        rows_dropped: before - rows.len(),
        duplicate_rows,
    };
    Ok((rows, summary))
}

#[cfg(test)]
mod tests {
    use super::*;
    use haloflow::records::{prompt_id, Message};

    fn pair(id: &str, q: &str, chosen: &str, rejected: &str) -> PairedRow {
        let prompt = vec![Message::new("user", q)];
        PairedRow {
            prompt_id: prompt_id(&prompt),
            pair_id: id.into(),
            prompt,
            chosen: chosen.into(),
            rejected: rejected.into(),
            score_chosen: None,
            score_rejected: None,
            source: None,
        }
    }

    #[test]
    fn each_pair_gives_one_row_per_label_with_its_prompt_id() {
        let pairs = vec![pair("a", "q1", "good", "bad"), pair("b", "q2", "fine", "poor")];
        let (rows, summary) = unpair(&pairs, false).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!((summary.desirable, summary.undesirable), (2, 2));
        assert_eq!(rows[0].example_id, "a:d");
        assert!(rows[0].label && !rows[1].label);
        assert_eq!(rows[1].prompt_id, pairs[0].prompt_id);
        assert_eq!(rows[1].completion, "bad");
    }

    #[test]
    fn conflicting_labels_are_counted_and_optionally_dropped() {
        // "x" is chosen in one pair and rejected in another for the same prompt.
        let pairs = vec![pair("a", "q", "x", "y"), pair("b", "q", "z", "x"), pair("c", "q2", "s", "t")];
        let (rows, summary) = unpair(&pairs, false).unwrap();
        assert_eq!(rows.len(), 6);
        assert_eq!((summary.conflicting_groups, summary.rows_in_conflicts, summary.rows_dropped), (1, 2, 0));
        let (rows, summary) = unpair(&pairs, true).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(summary.rows_dropped, 2);
        assert!(rows.iter().all(|r| r.completion != "x"));
    }

    #[test]
    fn empty_input_is_refused() {
        assert!(unpair(&[], false).unwrap_err().to_string().contains("no rows"));
    }
}
