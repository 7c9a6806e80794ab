//! The registry of built-in stages: what each one reads and writes.
//!
//! A built-in stage `NAME` is the binary `halo-NAME`, found next to the `halo` binary (or on
//! `PATH`). The runner calls it as a plain CLI: `--INPUT PATH` for each input, `--OUTPUT PATH`
//! for each output, and `--PARAM VALUE` for each param (underscores become hyphens), so
//! `halo-unpair --help` documents the same arguments a pipeline's `params` table sets.

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::schema;

/// Params of a stage as given in the pipeline (after variable substitution).
pub type Params = serde_json::Map<String, Value>;

/// A built-in stage's interface.
pub struct Builtin {
    /// Stage name (`uses = "NAME"`), binary `halo-NAME`.
    pub name: &'static str,
    /// One line on what it does.
    pub about: &'static str,
    /// Input names and the schemas each accepts (empty: a raw file in any format).
    pub inputs: &'static [(&'static str, &'static [&'static str])],
    /// Inputs a pipeline may leave out.
    pub optional: &'static [&'static str],
    /// Output names and schemas, which may depend on params.
    pub outputs: fn(&Params) -> Result<Vec<(String, String)>>,
    /// Whether the stage can run on several ranks (`ranks = N`), and how its output then
    /// relates to a single process's.
    pub ranks: Ranks,
}

/// How a stage behaves under `ranks = N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ranks {
    /// One process only: `ranks > 1` is refused when the pipeline is loaded.
    One,
    /// Rows are split across ranks and merged in order: the output is the one a single
    /// process writes, so the rank count is not part of the cache key.
    Same,
    /// Results depend on the world size within float tolerance (data-parallel training): the
    /// rank count is part of the cache key.
    Tolerance,
}

fn out(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(n, s)| (n.to_string(), s.to_string())).collect()
}

fn import_outputs(params: &Params) -> Result<Vec<(String, String)>> {
    let kind = match params.get("kind") {
        None => schema::PAIRED,
        Some(Value::String(k)) if k == schema::PAIRED || k == schema::BINARY || k == schema::PROMPTS => k.as_str(),
        Some(other) => bail!("params.kind must be \"paired\", \"binary\" or \"prompts\", found {other}"),
    };
    Ok(out(&[("data", kind), ("summary", schema::JSON)]))
}

/// All built-in stages.
/// The train stage's outputs; `merge_lora = true` adds `merged` (the LoRA adapters merged
/// into full weights).
fn train_outputs(params: &Params) -> Result<Vec<(String, String)>> {
    let mut outputs = out(&[("policy", schema::DIR), ("metrics", schema::METRICS), ("report", schema::DIR), ("summary", schema::JSON)]);
    match params.get("merge_lora") {
        None | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => outputs.push(("merged".into(), schema::DIR.into())),
        Some(other) => bail!("params.merge_lora must be true or false, found {other}"),
    }
    Ok(outputs)
}

pub fn builtins() -> Vec<Builtin> {
    vec![
        Builtin {
            name: "import",
            about: "import HH-RLHF, Open-Assistant, TRL-style JSONL/Parquet or prompt files",
            inputs: &[("source", &[])],
            optional: &[],
            outputs: import_outputs,
            ranks: Ranks::One,
        },
        Builtin {
            name: "unpair",
            about: "paired -> binary: one desirable and one undesirable example per pair",
            inputs: &[("pairs", &[schema::PAIRED])],
            optional: &[],
            outputs: |_| Ok(out(&[("binary", schema::BINARY), ("summary", schema::JSON)])),
            ranks: Ranks::One,
        },
        Builtin {
            name: "resample",
            about: "subsample classes, set lambda_D/lambda_U, write the stratified batch plan",
            inputs: &[("data", &[schema::BINARY])],
            optional: &[],
            outputs: |_| Ok(out(&[("plan", schema::PLAN), ("summary", schema::JSON)])),
            ranks: Ranks::One,
        },
        Builtin {
            name: "init",
            about: "a randomly initialised model of a given shape (for CI on a tiny model)",
            inputs: &[("tokenizer", &[schema::DIR])],
            optional: &[],
            outputs: |_| Ok(out(&[("out", schema::DIR)])),
            ranks: Ranks::One,
        },
        Builtin {
            name: "refcache",
            about: "precompute the reference model's completion log-probs to Parquet",
            inputs: &[("data", &[schema::PLAN, schema::PAIRED]), ("model", &[schema::DIR])],
            optional: &[],
            outputs: |_| Ok(out(&[("logps", schema::REF_LOGPS), ("summary", schema::JSON)])),
            ranks: Ranks::Same,
        },
        Builtin {
            name: "train",
            about: "align a policy with a HALO (KTO, DPO, ...) and report its training curves",
            inputs: &[("data", &[schema::PLAN, schema::PAIRED]), ("model", &[schema::DIR]), ("ref_logps", &[schema::REF_LOGPS])],
            optional: &["ref_logps"],
            outputs: train_outputs,
            ranks: Ranks::Tolerance,
        },
        Builtin {
            name: "sample",
            about: "sample completions for prompts with a local model (batched, KV cache, seeded) or an OpenAI-compatible server (vLLM, llama.cpp)",
            inputs: &[("prompts", &[schema::PROMPTS]), ("model", &[schema::DIR])],
            optional: &["model"],
            outputs: |_| Ok(out(&[("samples", schema::SAMPLES), ("summary", schema::JSON)])),
            ranks: Ranks::Same,
        },
        Builtin {
            name: "judge",
            about: "pairwise judge (OpenAI-compatible API, local LLM or rule) of a candidate vs a baseline: win rates, CIs, report",
            inputs: &[
                ("candidate", &[schema::SAMPLES]),
                ("baseline", &[schema::SAMPLES, schema::PAIRED]),
                ("prompts", &[schema::PROMPTS]),
                ("template_file", &[]),
                ("judge_model", &[schema::DIR]),
            ],
            optional: &["prompts", "template_file", "judge_model"],
            outputs: |_| Ok(out(&[("judgments", schema::JUDGMENTS), ("summary", schema::JSON), ("report", schema::DIR)])),
            ranks: Ranks::One,
        },
        Builtin {
            name: "import-gguf",
            about: "a GGUF file (llama.cpp) as a Hugging Face model directory, dequantized to f32",
            inputs: &[("gguf", &[])],
            optional: &[],
            outputs: |_| Ok(out(&[("model", schema::DIR)])),
            ranks: Ranks::One,
        },
    ]
}

/// Looks up a built-in stage, listing the known ones on failure.
pub fn builtin(name: &str) -> Result<Builtin> {
    let all = builtins();
    let names: Vec<&str> = all.iter().map(|b| b.name).collect();
    match all.into_iter().find(|b| b.name == name) {
        Some(b) => Ok(b),
        None => bail!("unknown built-in stage `{name}` (known: {})", names.join(", ")),
    }
}

/// The long flags (`--max-length`, ...) a stage binary's `--help` lists, as param names
/// (`max_length`).
pub fn flags_of(binary: &std::path::Path) -> Result<std::collections::BTreeSet<String>> {
    let out = std::process::Command::new(binary).arg("--help").output().with_context(|| format!("running {} --help", binary.display()))?;
    anyhow::ensure!(out.status.success(), "{} --help failed: {}", binary.display(), String::from_utf8_lossy(&out.stderr));
    let help = String::from_utf8_lossy(&out.stdout);
    Ok(help
        .split_whitespace()
        .filter_map(|word| word.strip_prefix("--"))
        .map(|flag| flag.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')).next().unwrap_or(""))
        .filter(|flag| !flag.is_empty())
        .map(|flag| flag.replace('-', "_"))
        .collect())
}

/// Checks a built-in stage's params against the flags of its binary: a param that no flag
/// takes is an error naming the stage, the param, the closest flag and the binary.
pub fn check_params(stage: &str, params: &Params, binary: &std::path::Path) -> Result<()> {
    let flags = flags_of(binary)?;
    for name in params.keys().filter(|k| !flags.contains(*k)) {
        let known: Vec<&str> = flags.iter().map(String::as_str).collect();
        let hint = crate::pipeline::closest(name, &known).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
        bail!("stage `{stage}`: param `{name}` is not a flag of {}{hint} (see its --help)", binary.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    }
    Ok(())
}

/// Renders params as CLI arguments: `--key=value` (underscores in keys become hyphens; one
/// argument, so a value starting with `-`, such as `-0.5` or the regex `-?\d+`, is never taken
/// for a flag). Strings are passed raw, other values as JSON (numbers, `true`/`false`, arrays).
pub fn param_args(params: &Params) -> Vec<String> {
    params
        .iter()
        .map(|(key, value)| {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("--{}={value}", key.replace('_', "-"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_become_flags() {
        let params: Params = serde_json::from_str(r#"{"drop_conflicts": true, "seed": 3, "name": "x y"}"#).unwrap();
        assert_eq!(param_args(&params), ["--drop-conflicts=true", "--seed=3", "--name=x y"]);
    }

    #[test]
    fn values_starting_with_a_hyphen_reach_the_stage_intact() {
        let params: Params = serde_json::from_str(r#"{"pattern": "-?\\d+", "offset": -0.5}"#).unwrap();
        let cli = clap::Command::new("stage")
            .arg(clap::Arg::new("pattern").long("pattern"))
            .arg(clap::Arg::new("offset").long("offset").value_parser(clap::value_parser!(f64)));
        let matches = cli.try_get_matches_from(std::iter::once("stage".to_string()).chain(param_args(&params))).unwrap();
        assert_eq!(matches.get_one::<String>("pattern").unwrap(), "-?\\d+");
        assert_eq!(*matches.get_one::<f64>("offset").unwrap(), -0.5);
    }

    #[test]
    fn merge_lora_adds_the_merged_output() {
        let train = builtin("train").unwrap();
        let names = |json: &str| -> Vec<String> { (train.outputs)(&serde_json::from_str(json).unwrap()).unwrap().into_iter().map(|(n, _)| n).collect() };
        assert_eq!(names("{}"), ["policy", "metrics", "report", "summary"]);
        assert_eq!(names(r#"{"merge_lora": true}"#), ["policy", "metrics", "report", "summary", "merged"]);
        assert!((train.outputs)(&serde_json::from_str(r#"{"merge_lora": "yes"}"#).unwrap()).is_err());
    }

    #[test]
    fn import_kind_selects_output_schema() {
        let params: Params = serde_json::from_str(r#"{"kind": "binary"}"#).unwrap();
        let outs = (builtin("import").unwrap().outputs)(&params).unwrap();
        assert_eq!(outs[0], ("data".to_string(), "binary".to_string()));
        assert!(builtin("unpiar").err().unwrap().to_string().contains("unpair"));
    }
}
