//! Getting results out of the cache (`halo export`): a stage output copied to a stable path,
//! tables converted to Parquet, CSV or JSON lines, and a model card for a trained policy.

use std::collections::BTreeMap;
use std::path::Path;
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::io::Table;
use crate::pipeline::{InputRef, Pipeline, Stage, StageKind};

/// What an output is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file or directory as it is in the cache.
    Copy,
    /// A zstd-compressed Parquet file (readable by DuckDB, pandas, polars).
    Parquet,
    /// CSV with a header row (flat columns only).
    Csv,
    /// One JSON object per row.
    Jsonl,
}

impl FromStr for Format {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Format> {
        Ok(match s {
            "copy" => Format::Copy,
            "parquet" => Format::Parquet,
            "csv" => Format::Csv,
            "jsonl" => Format::Jsonl,
            other => bail!("unknown export format `{other}` (use copy, parquet, csv or jsonl)"),
        })
    }
}

impl Format {
    /// The format a destination's extension asks for (`.parquet`, `.csv`, `.jsonl`), else a copy.
    pub fn from_dest(dest: &Path) -> Format {
        match dest.extension().and_then(|e| e.to_str()) {
            Some("parquet") => Format::Parquet,
            Some("csv") => Format::Csv,
            Some("jsonl") => Format::Jsonl,
            _ => Format::Copy,
        }
    }
}

/// Writes the table file `src` (Arrow IPC or Parquet) to `dest` in `format`, atomically.
pub fn write_table(src: &Path, dest: &Path, format: Format) -> Result<()> {
    let Table { schema, batches } = crate::io::read_table(src)?;
    match format {
        Format::Copy => copy_file(src, dest),
        Format::Parquet => crate::io::write_parquet(dest, &schema, &batches, schema.metadata().clone().into()),
        Format::Csv => {
            if let Some(nested) = schema.fields().iter().find(|f| f.data_type().is_nested()) {
                bail!("{}: column `{}` is nested ({}), which CSV cannot hold: export as jsonl or parquet", src.display(), nested.name(), crate::schema::type_name(nested.data_type()));
            }
            crate::io::write_atomic(dest, |w| {
                let mut writer = arrow_csv::Writer::new(w);
                for batch in &batches {
                    writer.write(batch)?;
                }
                Ok(())
            })
        }
        Format::Jsonl => crate::io::write_atomic(dest, |w| {
            let mut writer = arrow_json::LineDelimitedWriter::new(w);
            for batch in &batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            Ok(())
        }),
    }
}

/// Copies a file atomically.
pub fn copy_file(src: &Path, dest: &Path) -> Result<()> {
    crate::io::write_atomic(dest, |w| {
        let mut file = std::fs::File::open(src).with_context(|| format!("opening {}", src.display()))?;
        std::io::copy(&mut file, w).with_context(|| format!("copying {}", src.display()))?;
        Ok(())
    })
}

/// Copies the directory `src` to `dest` (replacing it), through a temporary sibling renamed
/// into place when complete; `extra` files (name, text) are written into the copy.
pub fn copy_dir(src: &Path, dest: &Path, extra: &[(&str, String)]) -> Result<()> {
    let tmp = crate::io::temp_sibling(dest);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    copy_tree(src, &tmp)?;
    for (name, text) in extra {
        std::fs::write(tmp.join(name), text).with_context(|| format!("writing {}", tmp.join(name).display()))?;
    }
    if dest.exists() {
        std::fs::remove_dir_all(dest).with_context(|| format!("replacing {}", dest.display()))?;
    }
    std::fs::rename(&tmp, dest).with_context(|| format!("renaming {} to {}", tmp.display(), dest.display()))
}

fn copy_tree(src: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    for entry in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
        let entry = entry?;
        let to = dest.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &to)?;
        } else {
            std::fs::copy(entry.path(), &to).with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Where an input comes from, as a reader of the card would name it.
fn describe(input: Option<&InputRef>) -> String {
    match input {
        Some(InputRef::Stage { stage, output }) => format!("`{stage}.{output}` (pipeline stage)"),
        Some(InputRef::File(path)) => format!("`{}`", path.display()),
        None => "—".into(),
    }
}

fn number(v: &Value) -> String {
    match v.as_f64() {
        Some(x) if x.fract() != 0.0 => format!("{x:.4}"),
        _ => v.to_string().trim_matches('"').to_string(),
    }
}

/// The judge results of a policy: every judge stage whose candidate samples were generated by
/// a sample stage from `train.policy`, with the judge's summary (by judge stage name).
pub fn judges_of<'a>(pipeline: &'a Pipeline, train: &str) -> Vec<&'a Stage> {
    let from_policy = |input: Option<&InputRef>| matches!(input, Some(InputRef::Stage { stage, output }) if stage == train && output == "policy");
    let samplers: Vec<&str> = pipeline.stages.iter().filter(|s| matches!(&s.kind, StageKind::Builtin(b) if b == "sample") && from_policy(s.inputs.get("model"))).map(|s| s.name.as_str()).collect();
    pipeline
        .stages
        .iter()
        .filter(|s| matches!(&s.kind, StageKind::Builtin(b) if b == "judge"))
        .filter(|s| matches!(s.inputs.get("candidate"), Some(InputRef::Stage { stage, .. }) if samplers.contains(&stage.as_str())))
        .collect()
}

/// A model card (README.md with Hugging Face front matter) for the policy of the train stage
/// `stage`: base model, data, loss and params, steps and final metrics from its summary, and
/// the win rates of `judges` (judge stage name → its summary.json).
pub fn model_card(pipeline: &Pipeline, stage: &Stage, summary: &Value, judges: &BTreeMap<String, Value>) -> String {
    let loss = summary["loss"].as_str().or_else(|| stage.params.get("loss").and_then(Value::as_str)).unwrap_or("kto");
    let base = describe(stage.inputs.get("model"));
    let mut card = format!("---\nlibrary_name: transformers\ntags:\n- haloflow\n- {loss}\n- alignment\n---\n\n");
    card += &format!("# {} / {}: a policy aligned with {}\n\n", pipeline.name, stage.name, loss.to_uppercase());
    card += &format!(
        "Trained by stage `{}` of the haloflow {} pipeline `{}` (`{}`).\n\n## Training\n\n| | |\n|---|---|\n",
        stage.name,
        env!("CARGO_PKG_VERSION"),
        pipeline.name,
        pipeline.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    );
    card += &format!("| base model | {base} |\n| data | {} ({}) |\n", describe(stage.inputs.get("data")), summary["data_kind"].as_str().unwrap_or("?"));
    card += &format!("| reference log-probs | {} |\n| loss | {loss} |\n", describe(stage.inputs.get("ref_logps")));
    for (name, value) in &stage.params {
        if name != "loss" {
            card += &format!("| {name} | {} |\n", number(value));
        }
    }
    for key in ["steps", "rows", "ranks", "device", "dtype"] {
        if let Some(v) = summary.get(key).filter(|v| !v.is_null()) {
            card += &format!("| {key} | {} |\n", number(v));
        }
    }
    if let Some(last) = summary["last"].as_object() {
        card += "\n## Final training metrics\n\n| metric | value |\n|---|---|\n";
        for (name, value) in last.iter().filter(|(_, v)| !v.is_null()) {
            card += &format!("| {name} | {} |\n", number(value));
        }
    }
    if !judges.is_empty() {
        card += "\n## Evaluation (pairwise judge)\n\n| judge stage | candidate vs baseline | judge | wins / losses / ties | win rate (95% CI) | sign test p |\n|---|---|---|---|---|---|\n";
        for (name, j) in judges {
            let t = j; // the judge's summary.json holds its counts at the top level
            let ci = t["win_rate_ci95"].as_array().map(|c| format!(" ({}–{})", number(&c[0]), number(&c[1]))).unwrap_or_default();
            card += &format!(
                "| {name} | {} vs {} | {} {} | {} / {} / {} | {}{ci} | {} |\n",
                j["candidate"].as_str().unwrap_or("?"),
                j["baseline"].as_str().unwrap_or("?"),
                j["judge"]["backend"].as_str().unwrap_or("?"),
                j["judge"]["model"].as_str().unwrap_or(""),
                number(&t["wins"]),
                number(&t["losses"]),
                number(&t["ties"]),
                number(&t["win_rate"]),
                number(&t["sign_test_p_value"]),
            );
        }
    }
    card += "\nEvery number above is read from the stage outputs of the run (summary.json of the train and judge stages).\n";
    card
}

/// The output `name` of a stage, parsed from `STAGE.OUTPUT`.
pub fn parse_target(target: &str) -> Result<(String, String)> {
    match target.split_once('.') {
        Some((stage, output)) if !stage.is_empty() && !output.is_empty() => Ok((stage.to_string(), output.to_string())),
        _ => bail!("`{target}`: expected STAGE.OUTPUT (e.g. train.policy)"),
    }
}

/// Refuses to replace an existing destination unless asked to.
pub fn check_dest(dest: &Path, force: bool) -> Result<()> {
    if dest.exists() && !force {
        bail!("{} exists: give --force to replace it", dest.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_formats_parse() {
        assert_eq!(parse_target("train.policy").unwrap(), ("train".into(), "policy".into()));
        assert!(parse_target("train").is_err() && parse_target(".x").is_err());
        assert_eq!(Format::from_dest(Path::new("out/m.parquet")), Format::Parquet);
        assert_eq!(Format::from_dest(Path::new("policy")), Format::Copy);
        assert!("xlsx".parse::<Format>().unwrap_err().to_string().contains("jsonl"));
    }

    #[test]
    fn the_card_names_base_model_loss_params_metrics_and_judges() {
        let text = r#"
[pipeline]
name = "demo"
[stages.train]
uses = "train"
inputs = { data = "plan.arrow", model = "models/base" }
params = { loss = "kto", beta = 0.1 }
[stages.sample]
uses = "sample"
inputs = { prompts = "p.arrow", model = "train.policy" }
[stages.judge]
uses = "judge"
inputs = { candidate = "sample.samples", baseline = "b.arrow" }
params = { backend = "rule" }
"#;
        let pipeline = Pipeline::parse(text, Path::new("/tmp/demo.toml"), &[]).unwrap();
        let judges = judges_of(&pipeline, "train");
        assert_eq!(judges.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["judge"]);
        let summary = serde_json::json!({"loss": "kto", "data_kind": "plan", "steps": 40, "last": {"step": 40, "loss": 0.4213, "rewards/chosen": null}});
        let judge = serde_json::json!({"candidate": "policy", "baseline": "base", "judge": {"backend": "rule", "model": "rule"},
            "wins": 46, "losses": 9, "ties": 185, "win_rate": 0.577, "win_rate_ci95": [0.514, 0.638], "sign_test_p_value": 4.3e-7});
        let card = model_card(&pipeline, pipeline.stage("train").unwrap(), &summary, &BTreeMap::from([("judge".to_string(), judge)]));
        assert!(card.starts_with("---\nlibrary_name: transformers\ntags:\n- haloflow\n- kto\n"), "{card}");
        for needle in ["| base model | `/tmp/models/base` |", "| beta | 0.1000 |", "| steps | 40 |", "| loss | 0.4213 |", "| judge | policy vs base | rule rule | 46 / 9 / 185 | 0.5770 (0.5140–0.6380) |"] {
            assert!(card.contains(needle), "missing {needle:?} in\n{card}");
        }
        assert!(!card.contains("rewards/chosen"), "null metrics are left out");
    }
}
