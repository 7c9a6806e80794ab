//! Parameter sweeps: a stage's `matrix = { beta = [0.05, 0.1], loss = ["kto", "apo_zero"] }`
//! expands it into one instance per combination of values (`train[beta=0.05,loss=kto]`, ...),
//! each with those params set, and every stage downstream of a swept stage expands with it
//! (`sample[beta=0.05,loss=kto]` reads `train[beta=0.05,loss=kto].policy`). Instances are
//! ordinary stages: each has its own cache key, so changing one value reruns only that
//! instance's stages. A `run` stage gathers every instance with an input such as
//! `reports = "judge[*].summary"`: it runs once, reading each instance through an input of its
//! own (`reports[beta=0.05,loss=kto]`), and an argument holding `{in.reports}` or
//! `{point.reports}` is repeated once per instance (`--summary={in.reports}`).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::pipeline::{is_gather, Gathered, InputRef, Stage, GATHER};

/// One combination of a matrix: the instance-name suffix and the params it sets.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// `[beta=0.05,loss=kto]`.
    pub suffix: String,
    /// Param name → value, in the matrix's (sorted) key order.
    pub params: Vec<(String, Value)>,
}

/// A swept stage and its points.
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    /// Every combination, in order (the last key varies fastest).
    pub points: Vec<Point>,
    /// The stages expanded with it, by the names written in the pipeline: the swept stage
    /// first, then those downstream of it.
    pub stages: Vec<String>,
}

impl Sweep {
    /// A sweep of the stage `stage` (its name as written, `train`) over `points`.
    pub fn new(stage: String, points: Vec<Point>) -> Sweep {
        Sweep { points, stages: vec![stage] }
    }

    /// The swept stage's name as written (`train`).
    pub fn stage(&self) -> &str {
        &self.stages[0]
    }
}

/// How a value appears in an instance name.
fn show(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The combinations of a stage's matrix. Every key needs at least one value, values of a key
/// must differ, and string values must be plain names (`[A-Za-z0-9_.-]`), since instance names
/// become file names of logs and tracking directories.
pub fn points(stage: &str, matrix: &BTreeMap<String, Vec<Value>>) -> Result<Vec<Point>> {
    let mut points = vec![Point { suffix: String::new(), params: Vec::new() }];
    for (key, values) in matrix {
        if values.is_empty() {
            bail!("stage `{stage}`: matrix `{key}` has no values");
        }
        let mut seen = BTreeSet::new();
        for v in values {
            let shown = show(v);
            if shown.is_empty() || !shown.chars().all(|c| c.is_ascii_alphanumeric() || "_.-+".contains(c)) || v.is_object() || v.is_array() {
                bail!("stage `{stage}`: matrix `{key}` value {v}: sweep values must be numbers, booleans or plain names ([A-Za-z0-9_.-])");
            }
            if !seen.insert(shown.clone()) {
                bail!("stage `{stage}`: matrix `{key}` lists {shown} twice");
            }
        }
        points = points
            .into_iter()
            .flat_map(|p| {
                values.iter().map(move |v| {
                    let mut params = p.params.clone();
                    params.push((key.clone(), v.clone()));
                    Point { suffix: String::new(), params }
                })
            })
            .collect();
    }
    for p in &mut points {
        p.suffix = format!("[{}]", p.params.iter().map(|(k, v)| format!("{k}={}", show(v))).collect::<Vec<_>>().join(","));
    }
    Ok(points)
}

/// Expands every stage that reads a swept stage (directly or through other expanded stages)
/// into one instance per point, its inputs rewired to the instances with the same point. A
/// stage that reads two different sweeps is refused.
pub fn expand_downstream(mut stages: Vec<Stage>, sweeps: &mut [Sweep]) -> Result<Vec<Stage>> {
    // Stage name as written → the sweep it follows.
    let mut follows: BTreeMap<String, usize> = sweeps.iter().enumerate().map(|(i, s)| (s.stage().to_string(), i)).collect();
    let swept_inputs = |stage: &Stage, follows: &BTreeMap<String, usize>| -> Vec<usize> {
        stage
            .inputs
            .values()
            .filter_map(|r| match r {
                InputRef::Stage { stage, .. } => follows.get(stage).copied(),
                InputRef::File(_) => None,
            })
            .collect()
    };
    while let Some(i) = stages.iter().position(|s| !swept_inputs(s, &follows).is_empty()) {
        let stage = stages.remove(i);
        let read = swept_inputs(&stage, &follows);
        if let Some(&other) = read.iter().find(|&&s| s != read[0]) {
            bail!("stage `{}` reads two different sweeps (of `{}` and of `{}`): a stage may follow one sweep", stage.name, sweeps[read[0]].stage(), sweeps[other].stage());
        }
        for point in &sweeps[read[0]].points {
            let mut instance = stage.clone();
            instance.name = format!("{}{}", stage.name, point.suffix);
            for input in instance.inputs.values_mut() {
                if let InputRef::Stage { stage: from, .. } = input {
                    if follows.contains_key(from.as_str()) {
                        *from = format!("{from}{}", point.suffix);
                    }
                }
            }
            stages.push(instance);
        }
        sweeps[read[0]].stages.push(stage.name.clone());
        follows.insert(stage.name, read[0]);
    }
    Ok(stages)
}

/// Replaces each gathering input (`reports = "judge[*].summary"`) by one input per instance of
/// the sweep its stage follows (`reports[beta=0.05]` = `judge[beta=0.05].summary`), recorded in
/// the stage's `gathers`. Gathering a stage that no sweep expands is an error.
pub fn expand_gathers(stages: &mut [Stage], sweeps: &[Sweep]) -> Result<()> {
    for stage in stages.iter_mut() {
        let gathering: Vec<String> = stage.inputs.iter().filter(|(_, r)| is_gather(r)).map(|(n, _)| n.clone()).collect();
        for name in gathering {
            let Some(InputRef::Stage { stage: from, output }) = stage.inputs.remove(&name) else { unreachable!("a gathering input names a stage") };
            let swept = &from[..from.len() - GATHER.len()];
            let Some(sweep) = sweeps.iter().find(|s| s.stages.iter().any(|n| n == swept)) else {
                bail!("stage `{}` input `{name}` gathers `{from}.{output}`, but `{swept}` is not swept (no `matrix` on it or upstream of it)", stage.name);
            };
            let mut instances = Vec::new();
            for point in &sweep.points {
                let input = format!("{name}{}", point.suffix);
                stage.inputs.insert(input.clone(), InputRef::Stage { stage: format!("{swept}{}", point.suffix), output: output.clone() });
                instances.push(Gathered { input, point: point.suffix[1..point.suffix.len() - 1].to_string() });
            }
            stage.gathers.insert(name, instances);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_the_product_in_key_order() {
        let matrix: BTreeMap<String, Vec<Value>> = serde_json::from_str(r#"{"loss": ["kto", "apo_zero"], "beta": [0.05, 0.1]}"#).unwrap();
        let p = points("train", &matrix).unwrap();
        let names: Vec<&str> = p.iter().map(|p| p.suffix.as_str()).collect();
        assert_eq!(names, ["[beta=0.05,loss=kto]", "[beta=0.05,loss=apo_zero]", "[beta=0.1,loss=kto]", "[beta=0.1,loss=apo_zero]"]);
        assert_eq!(p[3].params, [("beta".to_string(), serde_json::json!(0.1)), ("loss".to_string(), serde_json::json!("apo_zero"))]);
    }

    #[test]
    fn bad_matrices_are_refused() {
        let bad = |json: &str| points("t", &serde_json::from_str(json).unwrap()).unwrap_err().to_string();
        assert!(bad(r#"{"beta": []}"#).contains("no values"));
        assert!(bad(r#"{"beta": [0.1, 0.1]}"#).contains("twice"));
        assert!(bad(r#"{"name": ["../x"]}"#).contains("plain names"));
    }
}
