//! Reading a loss's params from a pipeline's JSON map, with defaults and range checks.

use std::cell::RefCell;

use anyhow::{bail, Result};
use serde_json::{Map, Value};

/// The range a param must lie in.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Bound {
    /// `> 0`.
    Positive,
    /// `≥ 0`.
    NonNegative,
    /// `[0, 1]`.
    Unit,
    /// `(0, 1)`.
    OpenUnit,
}

impl Bound {
    fn admits(self, v: f64) -> bool {
        match self {
            Bound::Positive => v > 0.0,
            Bound::NonNegative => v >= 0.0,
            Bound::Unit => (0.0..=1.0).contains(&v),
            Bound::OpenUnit => v > 0.0 && v < 1.0,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Bound::Positive => "> 0",
            Bound::NonNegative => "≥ 0",
            Bound::Unit => "in [0, 1]",
            Bound::OpenUnit => "in (0, 1)",
        }
    }
}

/// The params of one loss; remembers which ones the loss read, so that [`Params::finish`] can
/// refuse the others.
pub(crate) struct Params<'a> {
    loss: &'a str,
    map: &'a Map<String, Value>,
    read: RefCell<Vec<&'static str>>,
}

impl<'a> Params<'a> {
    /// The params `map` given to the loss `loss`.
    pub(crate) fn new(loss: &'a str, map: &'a Map<String, Value>) -> Params<'a> {
        Params { loss, map, read: RefCell::new(Vec::new()) }
    }

    /// The number `key`, or `default` when absent; an error when it is not a finite number in `bound`.
    pub(crate) fn number(&self, key: &'static str, default: f64, bound: Bound) -> Result<f64> {
        Ok(self.optional(key, bound)?.unwrap_or(default))
    }

    /// The number `key` when given; an error when it is not a finite number in `bound`.
    pub(crate) fn optional(&self, key: &'static str, bound: Bound) -> Result<Option<f64>> {
        let loss = self.loss;
        self.read.borrow_mut().push(key);
        let Some(value) = self.map.get(key) else { return Ok(None) };
        match value.as_f64() {
            Some(v) if v.is_finite() && bound.admits(v) => Ok(Some(v)),
            Some(v) => bail!("param `{key}` of loss `{loss}` must be {}, got {v}", bound.describe()),
            None => bail!("param `{key}` of loss `{loss}` must be a number, got {value}"),
        }
    }

    /// Refuses the params the loss did not read.
    pub(crate) fn finish(self) -> Result<()> {
        let read = self.read.into_inner();
        if let Some(key) = self.map.keys().find(|k| !read.contains(&k.as_str())) {
            let known = if read.is_empty() { "none".to_string() } else { read.join(", ") };
            bail!("unknown param `{key}` for loss `{}` (it takes: {known})", self.loss);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bounds_include_and_exclude_their_edges() {
        assert!(Bound::NonNegative.admits(0.0) && !Bound::Positive.admits(0.0));
        assert!(Bound::Unit.admits(0.0) && Bound::Unit.admits(1.0) && !Bound::Unit.admits(1.01));
        assert!(!Bound::OpenUnit.admits(0.0) && !Bound::OpenUnit.admits(1.0) && Bound::OpenUnit.admits(0.5));
    }

    #[test]
    fn a_loss_without_params_says_so() {
        let map = json!({"beta": 0.1}).as_object().unwrap().clone();
        let err = Params::new("sft", &map).finish().unwrap_err().to_string();
        assert_eq!(err, "unknown param `beta` for loss `sft` (it takes: none)");
    }

    #[test]
    fn out_of_range_and_absent_values() {
        let map = json!({"beta": -1}).as_object().unwrap().clone();
        let p = Params::new("dpo", &map);
        assert!(p.number("beta", 0.1, Bound::Positive).is_err());
        assert_eq!(p.optional("gamma", Bound::Positive).unwrap(), None);
        assert_eq!(p.number("tau", 0.3, Bound::Positive).unwrap(), 0.3);
    }
}
