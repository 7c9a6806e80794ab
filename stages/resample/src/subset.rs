//! Splitting the input by label and keeping a seeded random fraction of each class.

use anyhow::{bail, Result};
use haloflow::records::BinaryRow;

use crate::rng::Rng;

/// Refuses a class fraction outside `(0, 1]`; `flag` names the option in the message.
pub fn check_fraction(flag: &str, fraction: f64) -> Result<()> {
    if !(fraction > 0.0 && fraction <= 1.0) {
        bail!("{flag} must be in (0, 1] (a share of the rows of that class to keep), got {fraction}");
    }
    Ok(())
}

/// Splits rows into (desirable, undesirable), keeping the input order within each class.
pub fn split_by_label(rows: Vec<BinaryRow>) -> (Vec<BinaryRow>, Vec<BinaryRow>) {
    rows.into_iter().partition(|row| row.label)
}

/// Keeps a uniformly random subset of `round(fraction·n)` rows, in input order.
pub fn keep_fraction(rows: Vec<BinaryRow>, fraction: f64, rng: &mut Rng) -> Vec<BinaryRow> {
    let keep = ((fraction * rows.len() as f64).round() as usize).min(rows.len());
    let mut order: Vec<usize> = (0..rows.len()).collect();
    rng.shuffle(&mut order);
    let mut kept = vec![false; rows.len()];
    for &i in &order[..keep] {
        kept[i] = true;
    }
    rows.into_iter().zip(kept).filter_map(|(row, keep)| keep.then_some(row)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_rows::row;

    #[test]
    fn fractions_outside_zero_one_are_refused_by_name() {
        for bad in [0.0, -0.5, 1.5, f64::NAN, f64::INFINITY] {
            let err = check_fraction("--desirable-fraction", bad).unwrap_err().to_string();
            assert!(err.contains("--desirable-fraction") && err.contains("(0, 1]"), "{err}");
        }
        check_fraction("--undesirable-fraction", 1.0).unwrap();
        check_fraction("--undesirable-fraction", 0.01).unwrap();
    }

    #[test]
    fn keeps_a_rounded_seeded_subset_in_input_order() {
        let rows: Vec<_> = (0..25).map(|i| row(i, i, true)).collect();
        let pick = |seed| keep_fraction(rows.clone(), 0.3, &mut Rng::new(seed));
        let a = pick(1);
        assert_eq!(a.len(), 8); // round(7.5)
        assert!(a.windows(2).all(|w| w[0].example_id < w[1].example_id));
        assert_eq!(a, pick(1));
        assert_ne!(a, pick(2));
        assert_eq!(keep_fraction(rows.clone(), 1.0, &mut Rng::new(5)), rows);
    }

    #[test]
    fn split_keeps_order() {
        let rows: Vec<_> = (0..6).map(|i| row(i, i, i % 3 == 0)).collect();
        let (d, u) = split_by_label(rows);
        let ids = |v: &[BinaryRow]| v.iter().map(|r| r.example_id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(&d), ["e000", "e003"]);
        assert_eq!(ids(&u), ["e001", "e002", "e004", "e005"]);
    }
}
