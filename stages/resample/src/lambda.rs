//! The class weights λ_D and λ_U of the KTO loss (spec `LOSSES.md`, the paper's Eq. 8).
//!
//! Eq. 8 asks for `λ_D·n_D / (λ_U·n_U) ∈ [1, 4/3]` with one of the two weights equal to 1.
//! [`choose`] applies it when the user sets neither weight, and otherwise honours the user's
//! values and reports a warning when they leave the interval.

use anyhow::{bail, ensure, Result};

/// Lower end of the Eq. 8 interval for `λ_D·n_D / (λ_U·n_U)`.
pub const RATIO_MIN: f64 = 1.0;
/// Upper end of the Eq. 8 interval for `λ_D·n_D / (λ_U·n_U)`.
pub const RATIO_MAX: f64 = 4.0 / 3.0;

/// Chosen weights and how they relate to the class counts.
#[derive(Debug, Clone, PartialEq)]
pub struct Lambdas {
    /// λ_D, the weight of desirable examples.
    pub lambda_d: f64,
    /// λ_U, the weight of undesirable examples.
    pub lambda_u: f64,
    /// True when both weights were set by the Eq. 8 rule, false when the user gave one or both.
    pub automatic: bool,
    /// `λ_D·n_D / (λ_U·n_U)` for the counts the weights were chosen for.
    pub ratio: f64,
    /// Set when user-given weights put the ratio outside `[1, 4/3]`.
    pub warning: Option<String>,
}

/// Whether a weighted class ratio lies in Eq. 8's interval `[1, 4/3]` (with a tolerance of
/// 1e-12 for rounding in the division).
pub fn in_range(ratio: f64) -> bool {
    (RATIO_MIN - 1e-12..=RATIO_MAX + 1e-12).contains(&ratio)
}

/// `num/den` rounded up to 4 decimals, computed exactly in integers.
fn ceil_4_decimals(num: u128, den: u128) -> f64 {
    (num * 10_000).div_ceil(den) as f64 / 10_000.0
}

/// The weights of Eq. 8 for `n_d` desirable and `n_u` undesirable rows (both positive).
///
/// Both are 1 when `n_d/n_u` already lies in `[1, 4/3]`. Below 1, λ_U = 1 and λ_D = `n_u/n_d`
/// rounded up to 4 decimals (ratio just ≥ 1). Above 4/3, λ_D = 1 and λ_U = `(n_d/n_u)·3/4`
/// rounded up to 4 decimals (ratio just ≤ 4/3). The result is checked to lie in the interval.
pub fn eq8(n_d: usize, n_u: usize) -> Result<Lambdas> {
    ensure!(n_d > 0 && n_u > 0, "Eq. 8 needs both classes (got {n_d} desirable, {n_u} undesirable)");
    let (d, u) = (n_d as u128, n_u as u128);
    let (lambda_d, lambda_u) = if d < u {
        (ceil_4_decimals(u, d), 1.0)
    } else if 3 * d > 4 * u {
        (1.0, ceil_4_decimals(3 * d, 4 * u))
    } else {
        (1.0, 1.0)
    };
    let ratio = weighted_ratio(lambda_d, lambda_u, n_d, n_u);
    ensure!(
        in_range(ratio),
        "internal error: Eq. 8 weights λ_D = {lambda_d}, λ_U = {lambda_u} give ratio {ratio} outside [1, 4/3] \
         for {n_d} desirable / {n_u} undesirable rows"
    );
    Ok(Lambdas { lambda_d, lambda_u, automatic: true, ratio, warning: None })
}

/// `λ_D·n_D / (λ_U·n_U)`.
fn weighted_ratio(lambda_d: f64, lambda_u: f64, n_d: usize, n_u: usize) -> f64 {
    lambda_d * n_d as f64 / (lambda_u * n_u as f64)
}

/// Refuses a user-given weight that is not a finite positive number; `flag` names the option.
fn check_given(flag: &str, value: Option<f64>) -> Result<()> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            bail!("{flag} must be a finite number > 0, got {v}")
        }
        _ => Ok(()),
    }
}

/// The weights for `n_d`/`n_u` kept rows: Eq. 8 when neither is given, otherwise the given
/// ones (a missing one is 1), with a warning when the ratio leaves `[1, 4/3]`.
pub fn choose(n_d: usize, n_u: usize, given_d: Option<f64>, given_u: Option<f64>) -> Result<Lambdas> {
    check_given("--lambda-d", given_d)?;
    check_given("--lambda-u", given_u)?;
    if given_d.is_none() && given_u.is_none() {
        return eq8(n_d, n_u);
    }
    let (lambda_d, lambda_u) = (given_d.unwrap_or(1.0), given_u.unwrap_or(1.0));
    let ratio = weighted_ratio(lambda_d, lambda_u, n_d, n_u);
    let warning = (!in_range(ratio)).then(|| {
        format!(
            "λ_D·n_D / (λ_U·n_U) = {lambda_d}·{n_d} / ({lambda_u}·{n_u}) = {ratio:.4} lies outside \
             [1, 4/3] recommended by the KTO paper (Eq. 8); leave --lambda-d and --lambda-u unset \
             to choose them automatically"
        )
    });
    Ok(Lambdas { lambda_d, lambda_u, automatic: false, ratio, warning })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_ten_percent_of_desirables() {
        // 1:1 data, keep 10% of desirables: λ_D must land in [10, 13.33].
        let l = eq8(100, 1000).unwrap();
        assert!((10.0..=13.33).contains(&l.lambda_d), "{l:?}");
        assert_eq!((l.lambda_d, l.lambda_u, l.automatic), (10.0, 1.0, true));
        assert!(in_range(l.ratio));
    }

    #[test]
    fn ratio_already_in_range_keeps_both_at_one() {
        for (d, u) in [(1000, 1000), (1250, 1000), (4, 3), (400, 300)] {
            let l = eq8(d, u).unwrap();
            assert_eq!((l.lambda_d, l.lambda_u), (1.0, 1.0), "{d}/{u}");
        }
    }

    #[test]
    fn too_few_desirables_raise_lambda_d_rounded_up() {
        let l = eq8(3, 7).unwrap();
        assert_eq!((l.lambda_d, l.lambda_u), (2.3334, 1.0));
        assert!(l.ratio >= 1.0 && in_range(l.ratio), "{l:?}");
    }

    #[test]
    fn too_many_desirables_raise_lambda_u_rounded_up() {
        let l = eq8(1000, 7).unwrap();
        assert_eq!((l.lambda_d, l.lambda_u), (1.0, 107.1429));
        assert!(l.ratio <= RATIO_MAX && in_range(l.ratio), "{l:?}");
        let l = eq8(7, 3).unwrap();
        assert_eq!((l.lambda_d, l.lambda_u), (1.0, 1.75));
        // Every count pair lands in the interval.
        for d in 1..60 {
            for u in 1..60 {
                assert!(in_range(eq8(d, u).unwrap().ratio), "{d}/{u}");
            }
        }
    }

    #[test]
    fn given_weights_are_honoured_with_a_warning_outside_the_interval() {
        let l = choose(100, 1000, Some(1.0), Some(1.0)).unwrap();
        assert_eq!((l.lambda_d, l.lambda_u, l.automatic), (1.0, 1.0, false));
        assert!(l.warning.as_deref().unwrap().contains("outside"), "{l:?}");
        let l = choose(100, 1000, Some(12.0), None).unwrap();
        assert_eq!((l.lambda_d, l.lambda_u), (12.0, 1.0));
        assert!(l.warning.is_none());
        let err = choose(1, 1, Some(-1.0), None).unwrap_err().to_string();
        assert!(err.contains("--lambda-d"), "{err}");
        let err = choose(1, 1, None, Some(f64::NAN)).unwrap_err().to_string();
        assert!(err.contains("--lambda-u"), "{err}");
    }
}
