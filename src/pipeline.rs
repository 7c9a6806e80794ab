//! Pipeline files: parsing, variable substitution and validation.
//!
//! ```toml
//! [pipeline]
//! name = "example"            # default: the file's stem
//! work_dir = ".halo"          # default: .halo beside the pipeline file
//!
//! [vars]
//! data = "../../shared/data"
//!
//! [stages.import]
//! uses = "import"             # built-in stage: runs halo-import
//! inputs = { source = "{vars.data}/hh-rlhf/helpful-base-test.jsonl.gz" }
//! params = { format = "hh-rlhf" }
//!
//! [stages.filter]             # a user's own program, given as argv (never through a shell)
//! run = ["python3", "filter.py", "{in.pairs}", "{out.kept}", "{params.min_chars}"]
//! inputs = { pairs = "import.data" }    # STAGE.OUTPUT, or a file path
//! outputs = { kept = "paired" }         # output name = schema it must satisfy
//! params = { min_chars = 20 }
//! version = "1"
//! ranks = 2                   # optional: N local processes with the torchrun environment
//! launcher = "torchrun"       # optional: start them with `torchrun --no-python` instead
//! matrix = { min_chars = [20, 60] }     # optional: one instance per value (see `sweep`)
//!                             # an input "judge[*].summary" gathers every instance of a swept
//!                             # stage: an argument with {in.X} / {point.X} repeats per instance
//! resources = { partition = "gpu", gpus_per_node = 1, cpus = 4, mem = "16G", time = "01:00:00" }
//!                             # optional: what the stage's Slurm job asks for (executor = "slurm")
//! ```
//!
//! `[pipeline] executor = "slurm"` (or `halo run --executor slurm`) runs each stage as a Slurm job
//! through `srun` (see [`crate::slurm`]); the default, `"local"`, runs it on this machine.
//!
//! `{vars.NAME}` is replaced in inputs, params and argv; a param that is exactly `{vars.NAME}`
//! takes the variable's type. Relative paths are relative to the pipeline file's directory,
//! which is also the working directory of stage processes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;

use crate::schema::{self, SchemaDef};
use crate::slurm::Resources;
use crate::stages::{self, Params};
use crate::sweep::{self, Sweep};

/// Where a stage input comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum InputRef {
    /// Another stage's output (`"stage.output"`).
    Stage {
        /// Producing stage.
        stage: String,
        /// Output name of that stage.
        output: String,
    },
    /// A file or directory, absolute or relative to the pipeline directory.
    File(PathBuf),
}

impl std::fmt::Display for InputRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InputRef::Stage { stage, output } => write!(f, "{stage}.{output}"),
            InputRef::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// What a stage runs.
#[derive(Debug, Clone)]
pub enum StageKind {
    /// A built-in stage `halo-NAME`.
    Builtin(String),
    /// A user command: argv with `{in.X}`, `{out.Y}`, `{params.Z}` placeholders left to fill.
    Command(Vec<String>),
}

/// One resolved stage of a pipeline.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Unique name within the pipeline.
    pub name: String,
    /// Built-in or command.
    pub kind: StageKind,
    /// Inputs by name.
    pub inputs: BTreeMap<String, InputRef>,
    /// Outputs in declaration order, with the schema each must satisfy.
    pub outputs: Vec<(String, SchemaDef)>,
    /// Params after variable substitution.
    pub params: Params,
    /// Optional user-given version, part of a command stage's identity.
    pub version: Option<String>,
    /// Processes the stage runs as (`ranks = N`, default 1), each with the torchrun
    /// environment (RANK, WORLD_SIZE, ...).
    pub ranks: usize,
    /// How those processes are started.
    pub launcher: Launcher,
    /// What its Slurm job asks for (used by the Slurm executor only).
    pub resources: Resources,
    /// Inputs that gather every instance of a swept stage (`r = "judge[*].summary"`), by the
    /// name written in the pipeline; each instance is read through its own entry of `inputs`.
    pub gathers: BTreeMap<String, Vec<Gathered>>,
}

/// One instance a gathering input reads (see [`Stage::gathers`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Gathered {
    /// The entry of the stage's `inputs` it is read through (`r[beta=0.05]`).
    pub input: String,
    /// Its sweep point without brackets (`beta=0.05`), the value of `{point.r}`.
    pub point: String,
}

/// The suffix that makes an input reference gather every instance of a swept stage.
pub const GATHER: &str = "[*]";

/// Where the stages of a pipeline run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Executor {
    /// On this machine, as processes of the runner (default).
    #[default]
    Local,
    /// Each stage as a Slurm job started with `srun`.
    Slurm,
}

impl std::str::FromStr for Executor {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> Result<Executor> {
        match s {
            "local" => Ok(Executor::Local),
            "slurm" => Ok(Executor::Slurm),
            other => bail!("executor = \"{other}\": expected \"local\" or \"slurm\""),
        }
    }
}

/// How the runner starts the processes of a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Launcher {
    /// The runner starts each rank itself (default).
    #[default]
    Local,
    /// `torchrun --standalone --nproc-per-node N --no-python PROGRAM ARGS...`.
    Torchrun,
}

impl Stage {
    /// Names of the stages this one reads from.
    pub fn upstream(&self) -> BTreeSet<&str> {
        self.inputs
            .values()
            .filter_map(|i| match i {
                InputRef::Stage { stage, .. } => Some(stage.as_str()),
                InputRef::File(_) => None,
            })
            .collect()
    }
}

/// A parsed, validated pipeline; stages are in a topological order.
#[derive(Debug, Clone)]
pub struct Pipeline {
    /// Pipeline name (used for the lock file).
    pub name: String,
    /// The pipeline file.
    pub path: PathBuf,
    /// Its directory: base of relative paths and working directory of stages.
    pub dir: PathBuf,
    /// Where the cache, lock files and run manifests live.
    pub work_dir: PathBuf,
    /// Variables after `--set` overrides.
    pub vars: BTreeMap<String, Value>,
    /// The swept stages and their points (`matrix`); their instances are in `stages`.
    pub sweeps: Vec<Sweep>,
    /// The `--set` overrides as given (`NAME=VALUE`, `STAGE.PARAM=VALUE`), saved in the
    /// manifest so `halo status` can use the last run's.
    pub overrides: Vec<String>,
    /// Where its stages run (`[pipeline] executor`; `halo run --executor` overrides it).
    pub executor: Executor,
    /// Stages in topological order (ties broken by declaration order).
    pub stages: Vec<Stage>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    pipeline: RawMeta,
    #[serde(default)]
    vars: serde_json::Map<String, Value>,
    #[serde(default)]
    stages: serde_json::Map<String, Value>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: Option<String>,
    work_dir: Option<String>,
    executor: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(deny_unknown_fields)]
struct RawStage {
    uses: Option<String>,
    run: Option<Vec<String>>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    outputs: BTreeMap<String, String>,
    #[serde(default)]
    params: Params,
    version: Option<String>,
    ranks: Option<Value>,
    launcher: Option<String>,
    /// Param values to sweep (see [`crate::sweep`]).
    #[serde(default)]
    matrix: BTreeMap<String, Vec<Value>>,
    resources: Option<Value>,
}

impl Pipeline {
    /// Loads a pipeline file; `overrides` are `NAME=VALUE` settings of `[vars]` (VALUE is read
    /// as a TOML value when it parses as one, else as a string).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Pipeline> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading pipeline {}", path.display()))?;
        Self::parse(&text, path, overrides).with_context(|| format!("pipeline {}", path.display()))
    }

    /// Parses pipeline text as if it were read from `path`.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Pipeline> {
        let raw: RawFile = toml::from_str(text).map_err(|e| anyhow!("{e}"))?;
        // Absolute, because stages run in this directory while the runner may not.
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let dir = std::path::absolute(dir).with_context(|| format!("resolving {}", dir.display()))?;
        let mut vars: BTreeMap<String, Value> = raw.vars.into_iter().collect();
        let mut stage_params: BTreeMap<String, BTreeMap<String, Value>> = BTreeMap::new();
        for o in overrides {
            let (k, v) = o.split_once('=').with_context(|| format!("--set {o}: expected NAME=VALUE or STAGE.PARAM=VALUE"))?;
            if vars.contains_key(k) {
                vars.insert(k.to_string(), parse_override(v));
            } else if let Some((stage, param)) = k.split_once('.').filter(|(s, _)| raw.stages.contains_key(*s)) {
                stage_params.entry(stage.to_string()).or_default().insert(param.to_string(), parse_override(v));
            } else {
                let known: Vec<&str> = vars.keys().map(String::as_str).collect();
                let hint = closest(k, &known).map(|c| format!("; did you mean `{c}`?")).unwrap_or_default();
                bail!(
                    "--set {k}: no variable `{k}` in [vars] (variables: {}){hint} — a stage's param is set with --set STAGE.PARAM=VALUE",
                    if known.is_empty() { "none".to_string() } else { known.join(", ") }
                );
            }
        }
        let name = raw.pipeline.name.unwrap_or_else(|| {
            path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "pipeline".into())
        });
        check_name("pipeline", &name)?;
        let work_dir = dir.join(raw.pipeline.work_dir.as_deref().unwrap_or(".halo"));
        let executor = raw.pipeline.executor.as_deref().map(str::parse).transpose()?.unwrap_or_default();
        if raw.stages.is_empty() {
            bail!("no stages: add a [stages.NAME] table");
        }
        let names: Vec<String> = raw.stages.keys().cloned().collect();
        let mut stages = Vec::new();
        let mut sweeps = Vec::new();
        for (stage_name, value) in raw.stages {
            let mut raw_stage: RawStage = serde_json::from_value(value).map_err(|e| anyhow!("stage `{stage_name}`: {e}"))?;
            raw_stage.params.extend(stage_params.remove(&stage_name).unwrap_or_default());
            let matrix = std::mem::take(&mut raw_stage.matrix);
            if matrix.is_empty() {
                stages.push(resolve_stage(&stage_name, raw_stage, &vars, &dir, &names).with_context(|| format!("stage `{stage_name}`"))?);
                continue;
            }
            let points = sweep::points(&stage_name, &matrix)?;
            for point in &points {
                let mut instance = raw_stage.clone();
                instance.params.extend(point.params.iter().cloned());
                let mut stage = resolve_stage(&stage_name, instance, &vars, &dir, &names).with_context(|| format!("stage `{stage_name}{}`", point.suffix))?;
                stage.name = format!("{stage_name}{}", point.suffix);
                stages.push(stage);
            }
            sweeps.push(Sweep::new(stage_name, points));
        }
        let mut stages = sweep::expand_downstream(stages, &mut sweeps)?;
        sweep::expand_gathers(&mut stages, &sweeps)?;
        check_references(&stages)?;
        let stages = topological_order(stages)?;
        Ok(Pipeline { name, path: path.to_path_buf(), dir, work_dir, vars, sweeps, overrides: overrides.to_vec(), executor, stages })
    }

    /// The stage with this name, or an error listing the stages.
    pub fn stage(&self, name: &str) -> Result<&Stage> {
        self.stages.iter().find(|s| s.name == name).ok_or_else(|| {
            anyhow!(
                "no stage named `{name}` in pipeline {} (stages: {})",
                self.name,
                self.stages.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The named stages and everything downstream of them.
    pub fn with_descendants(&self, names: &[String]) -> Result<BTreeSet<String>> {
        let mut set = BTreeSet::new();
        for n in names {
            set.insert(self.stage(n)?.name.clone());
        }
        for stage in &self.stages {
            if stage.upstream().iter().any(|u| set.contains(*u)) {
                set.insert(stage.name.clone());
            }
        }
        Ok(set)
    }
}

/// Refuses a stage, output or pipeline name that could not serve as a plain file name inside
/// the work dir (`../x`, `a/b`, empty): such names become paths of outputs, logs and lock files.
pub fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        bail!("{what} name \"{name}\": {what} names may hold only letters, digits, `_` and `-`");
    }
    Ok(())
}

/// The candidate nearest to `name` by edit distance, if it is close enough to be a typo.
pub(crate) fn closest<'a>(name: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let b: Vec<char> = b.chars().collect();
        let mut row: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.chars().enumerate() {
            let mut prev = row[0];
            row[0] = i + 1;
            for (j, &cb) in b.iter().enumerate() {
                let next = (prev + usize::from(ca != cb)).min(row[j] + 1).min(row[j + 1] + 1);
                prev = row[j + 1];
                row[j + 1] = next;
            }
        }
        row[b.len()]
    };
    candidates
        .iter()
        .map(|c| (distance(name, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min()
        .map(|(_, c)| c)
}

fn parse_override(v: &str) -> Value {
    toml::from_str::<toml::Table>(&format!("v = {v}"))
        .ok()
        .and_then(|t| serde_json::to_value(&t["v"]).ok())
        .unwrap_or_else(|| Value::String(v.to_string()))
}

/// Replaces `{vars.NAME}` in a string.
fn expand_vars(s: &str, vars: &BTreeMap<String, Value>) -> Result<String> {
    let mut out = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("{vars.") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find('}').with_context(|| format!("unclosed `{{vars.` in \"{s}\""))? + start;
        let name = &rest[start + 6..end];
        let value = vars.get(name).with_context(|| {
            format!("unknown variable `{name}` in \"{s}\" (defined: {})", vars.keys().cloned().collect::<Vec<_>>().join(", "))
        })?;
        match value {
            Value::String(v) => out.push_str(v),
            other => out.push_str(&other.to_string()),
        }
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Substitutes variables in a param value; `"{vars.x}"` alone keeps x's type.
fn expand_value(v: Value, vars: &BTreeMap<String, Value>) -> Result<Value> {
    Ok(match v {
        Value::String(s) => {
            if let Some(name) = s.strip_prefix("{vars.").and_then(|r| r.strip_suffix('}')) {
                if let Some(value) = vars.get(name).filter(|_| !name.contains('{')) {
                    return Ok(value.clone());
                }
            }
            Value::String(expand_vars(&s, vars)?)
        }
        Value::Array(items) => Value::Array(items.into_iter().map(|i| expand_value(i, vars)).collect::<Result<_>>()?),
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| Ok((k, expand_value(v, vars)?))).collect::<Result<_>>()?)
        }
        other => other,
    })
}

fn resolve_stage(
    name: &str,
    raw: RawStage,
    vars: &BTreeMap<String, Value>,
    dir: &Path,
    stage_names: &[String],
) -> Result<Stage> {
    check_name("stage", name)?;
    let params = match expand_value(Value::Object(raw.params), vars)? {
        Value::Object(m) => m,
        _ => unreachable!("an object expands to an object"),
    };
    let mut inputs = BTreeMap::new();
    for (input, reference) in raw.inputs {
        let reference = expand_vars(&reference, vars).with_context(|| format!("input `{input}`"))?;
        let parsed = match reference.split_once('.') {
            Some((stage, output)) if stage_names.iter().any(|s| s == stage) && !output.contains('/') => {
                InputRef::Stage { stage: stage.to_string(), output: output.to_string() }
            }
            // `judge[*].summary`: expanded into one input per instance once sweeps are known.
            Some((stage, output)) if stage.ends_with(GATHER) && !output.contains('/') => {
                let swept = &stage[..stage.len() - GATHER.len()];
                if !stage_names.iter().any(|s| s == swept) {
                    bail!("input `{input}` gathers `{reference}`, but there is no stage `{swept}` (stages: {})", stage_names.join(", "));
                }
                InputRef::Stage { stage: stage.to_string(), output: output.to_string() }
            }
            _ => InputRef::File(dir.join(&reference)),
        };
        inputs.insert(input, parsed);
    }
    let (kind, outputs) = match (raw.uses, raw.run) {
        (Some(_), Some(_)) => bail!("give either `uses` (a built-in stage) or `run` (a command), not both"),
        (None, None) => bail!("missing `uses` (a built-in stage) or `run` (a command argv)"),
        (Some(uses), None) => {
            let builtin = stages::builtin(&uses)?;
            if let Some((input, r)) = inputs.iter().find(|(_, r)| is_gather(r)) {
                bail!("input `{input}` gathers `{r}`, but built-in stage `{uses}` reads one file per input: gather in a `run` stage");
            }
            if !raw.outputs.is_empty() {
                bail!("`outputs` is fixed for built-in stage `{uses}`; remove it");
            }
            let expected: BTreeSet<&str> = builtin.inputs.iter().map(|(n, _)| *n).collect();
            let required: BTreeSet<&str> = expected.iter().copied().filter(|n| !builtin.optional.contains(n)).collect();
            let given: BTreeSet<&str> = inputs.keys().map(|s| s.as_str()).collect();
            if !given.is_subset(&expected) || !required.is_subset(&given) {
                let optional = if builtin.optional.is_empty() { String::new() } else { format!(" (optional: {})", builtin.optional.join(", ")) };
                bail!(
                    "built-in stage `{uses}` takes inputs {{{}}}{optional}, the pipeline gives {{{}}}",
                    expected.into_iter().collect::<Vec<_>>().join(", "),
                    given.into_iter().collect::<Vec<_>>().join(", ")
                );
            }
            let outputs = (builtin.outputs)(&params)?
                .into_iter()
                .map(|(n, s)| Ok((n, schema::by_name(&s)?)))
                .collect::<Result<Vec<_>>>()?;
            (StageKind::Builtin(uses), outputs)
        }
        (None, Some(argv)) => {
            if argv.is_empty() {
                bail!("`run` is empty: give the program and its arguments as an array");
            }
            if raw.outputs.is_empty() {
                bail!("a command stage must declare `outputs = {{ NAME = \"SCHEMA\" }}`");
            }
            let outputs = raw
                .outputs
                .into_iter()
                .map(|(n, s)| {
                    check_name("output", &n)?;
                    Ok((n.clone(), schema::by_name(&s).with_context(|| format!("output `{n}`"))?))
                })
                .collect::<Result<Vec<_>>>()?;
            let argv = argv.iter().map(|a| expand_vars(a, vars)).collect::<Result<Vec<_>>>()?;
            for arg in &argv {
                check_placeholders(arg, &inputs, &outputs, &params)?;
            }
            let used: BTreeSet<&str> = argv.iter().flat_map(|a| placeholders(a)).filter_map(|p| p.strip_prefix("params.")).collect();
            if let Some(unused) = params.keys().find(|k| !used.contains(k.as_str())) {
                bail!("param `{unused}` is not passed to the command: no `{{params.{unused}}}` in `run` (remove it or pass it)");
            }
            (StageKind::Command(argv), outputs)
        }
    };
    let ranks = match raw.ranks {
        None => 1,
        Some(v) => parse_ranks(expand_value(v, vars)?)?,
    };
    if let StageKind::Builtin(uses) = &kind {
        if ranks > 1 && stages::builtin(uses)?.ranks == stages::Ranks::One {
            bail!("built-in stage `{uses}` cannot run on several ranks (ranks = {ranks}); only refcache, train and sample can shard their work");
        }
    }
    let launcher = match raw.launcher.as_deref() {
        None | Some("local") => Launcher::Local,
        Some("torchrun") => Launcher::Torchrun,
        Some(other) => bail!("launcher = \"{other}\": expected \"local\" or \"torchrun\""),
    };
    let resources = match raw.resources {
        None => Resources::default(),
        Some(v) => Resources::parse(expand_value(v, vars)?)?,
    };
    Ok(Stage { name: name.to_string(), kind, inputs, outputs, params, version: raw.version, ranks, launcher, resources, gathers: BTreeMap::new() })
}

/// Whether an input reference gathers the instances of a swept stage (`judge[*].summary`).
pub fn is_gather(reference: &InputRef) -> bool {
    matches!(reference, InputRef::Stage { stage, .. } if stage.ends_with(GATHER))
}

/// The `ranks` of a stage: a positive integer, given as a number or a string such as
/// `"{vars.ranks}"` (after substitution).
fn parse_ranks(value: Value) -> Result<usize> {
    let n = match &value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 1 => Ok(n as usize),
        _ => bail!("ranks = {value}: expected a positive integer (processes to run the stage as)"),
    }
}

/// The `{in.X}`, `{out.Y}`, `{params.Z}`, `{point.X}` and `{out_dir}` placeholders of an argv element.
pub fn placeholders(arg: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = arg;
    while let Some(start) = rest.find('{') {
        let Some(len) = rest[start..].find('}') else { break };
        let inner = &rest[start + 1..start + len];
        if inner == "out_dir" || ["in.", "out.", "params.", "point."].iter().any(|p| inner.starts_with(p)) {
            found.push(inner);
        }
        rest = &rest[start + len + 1..];
    }
    found
}

fn check_placeholders(
    arg: &str,
    inputs: &BTreeMap<String, InputRef>,
    outputs: &[(String, SchemaDef)],
    params: &Params,
) -> Result<()> {
    let mut gathered = BTreeSet::new();
    for p in placeholders(arg) {
        let ok = match p.split_once('.') {
            Some(("in" | "point", n)) if inputs.get(n).is_some_and(is_gather) => {
                gathered.insert(n);
                true
            }
            Some(("point", n)) => bail!("`run` argument \"{arg}\" uses {{point.{n}}}, but input `{n}` gathers no sweep (write it as \"STAGE[*].OUTPUT\")"),
            Some(("in", n)) => inputs.contains_key(n),
            Some(("out", n)) => outputs.iter().any(|(o, _)| o == n),
            Some(("params", n)) => params.contains_key(n),
            _ => true,
        };
        if !ok {
            bail!("`run` argument \"{arg}\" uses {{{p}}}, which is not declared");
        }
    }
    if gathered.len() > 1 {
        bail!("`run` argument \"{arg}\" uses two gathering inputs ({}): an argument repeats once per instance of one", gathered.into_iter().collect::<Vec<_>>().join(", "));
    }
    Ok(())
}

fn check_references(stages: &[Stage]) -> Result<()> {
    for stage in stages {
        for (input, reference) in &stage.inputs {
            if let InputRef::Stage { stage: from, output } = reference {
                let producer = stages.iter().find(|s| &s.name == from).expect("resolved against stage names");
                let Some((_, produced)) = producer.outputs.iter().find(|(o, _)| o == output) else {
                    bail!(
                        "stage `{}` input `{input}` refers to `{from}.{output}`, but stage `{from}` has no output `{output}` (its outputs: {})",
                        stage.name,
                        producer.outputs.iter().map(|(o, _)| o.as_str()).collect::<Vec<_>>().join(", ")
                    );
                };
                if let StageKind::Builtin(uses) = &stage.kind {
                    let builtin = stages::builtin(uses)?;
                    let wanted = builtin.inputs.iter().find(|(n, _)| n == input).map(|(_, s)| *s).unwrap_or_default();
                    if !wanted.is_empty() && !wanted.contains(&produced.name) {
                        bail!(
                            "stage `{}` input `{input}` expects a `{}` table, but `{from}.{output}` is `{}`",
                            stage.name,
                            wanted.join("` or `"),
                            produced.name
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// Orders stages so each comes after its inputs (Kahn's algorithm, declaration order for ties);
/// a cycle is an error that names the stages on it.
fn topological_order(stages: Vec<Stage>) -> Result<Vec<Stage>> {
    let mut done: BTreeSet<String> = BTreeSet::new();
    let mut remaining = stages;
    let mut ordered = Vec::new();
    while !remaining.is_empty() {
        let ready = remaining.iter().position(|s| s.upstream().iter().all(|u| done.contains(*u)));
        match ready {
            Some(i) => {
                let stage = remaining.remove(i);
                done.insert(stage.name.clone());
                ordered.push(stage);
            }
            None => bail!("the stages form a cycle: {}", describe_cycle(&remaining)),
        }
    }
    Ok(ordered)
}

fn describe_cycle(stuck: &[Stage]) -> String {
    // Walk upstream edges among the stuck stages until a stage repeats.
    let mut path: Vec<&str> = vec![stuck[0].name.as_str()];
    loop {
        let current = stuck.iter().find(|s| s.name == *path.last().unwrap()).unwrap();
        let next = current.upstream().into_iter().find(|u| stuck.iter().any(|s| s.name == *u)).unwrap();
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let mut cycle: Vec<&str> = path[pos..].to_vec();
            cycle.reverse();
            cycle.push(cycle[0]);
            return cycle.join(" -> ");
        }
        path.push(next);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Pipeline> {
        Pipeline::parse(text, Path::new("/tmp/p/pipe.toml"), &[])
    }

    const BASE: &str = r#"
[vars]
seed = 3
data = "/data"
[stages.import]
uses = "import"
inputs = { source = "{vars.data}/x.jsonl" }
[stages.unpair]
uses = "unpair"
inputs = { pairs = "import.data" }
[stages.resample]
uses = "resample"
inputs = { data = "unpair.binary" }
params = { seed = "{vars.seed}", note = "s{vars.seed}" }
"#;

    #[test]
    fn executor_and_resources_are_read_and_checked() {
        let p = parse(BASE).unwrap();
        assert_eq!(p.executor, Executor::Local);
        assert_eq!(p.stage("import").unwrap().resources, Resources::default());
        let text = format!("[pipeline]\nexecutor = \"slurm\"\n{}", BASE.replace(
            "params = { seed",
            "resources = { partition = \"gpu\", cpus = \"{vars.seed}\", mem = \"8G\", time = 30 }\nparams = { seed",
        ));
        let p = parse(&text).unwrap();
        assert_eq!(p.executor, Executor::Slurm);
        assert_eq!(p.stage("resample").unwrap().resources.srun_args(), ["--partition=gpu", "--cpus-per-task=3", "--mem=8G", "--time=30"]);
        let err = |t: String| format!("{:#}", parse(&t).unwrap_err());
        assert!(err(text.replace("executor = \"slurm\"", "executor = \"pbs\"")).contains("executor = \"pbs\": expected \"local\" or \"slurm\""));
        let e = err(text.replace("mem = ", "gpus = 1, mem = "));
        assert!(e.contains("stage `resample`: resources: unknown key(s) gpus"), "{e}");
        assert_eq!("slurm".parse::<Executor>().unwrap(), Executor::Slurm);
    }

    #[test]
    fn parses_references_vars_and_order() {
        let p = parse(BASE).unwrap();
        assert_eq!(p.name, "pipe");
        let names: Vec<_> = p.stages.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["import", "unpair", "resample"]);
        assert_eq!(p.stage("import").unwrap().inputs["source"], InputRef::File("/data/x.jsonl".into()));
        let r = p.stage("resample").unwrap();
        assert_eq!(r.params["seed"], serde_json::json!(3));
        assert_eq!(r.params["note"], serde_json::json!("s3"));
        let d = p.with_descendants(&["unpair".into()]).unwrap();
        assert_eq!(d.into_iter().collect::<Vec<_>>(), ["resample", "unpair"]);
    }

    #[test]
    fn set_overrides_vars_with_types() {
        let p = Pipeline::parse(BASE, Path::new("/tmp/p/pipe.toml"), &["seed=7".into()]).unwrap();
        assert_eq!(p.stage("resample").unwrap().params["seed"], serde_json::json!(7));
    }

    #[test]
    fn errors_are_specific() {
        let cases = [
            (BASE.replace("uses = \"unpair\"", "uses = \"unpiar\""), "unknown built-in stage `unpiar`"),
            (BASE.replace("import.data", "import.pairs"), "has no output `pairs`"),
            (BASE.replace("unpair.binary", "import.data"), "expects a `binary` table"),
            (BASE.replace("{vars.seed}\"", "{vars.sed}\""), "unknown variable `sed`"),
            (format!("{BASE}\n[stages.unpair]\nuses = \"unpair\"\n"), "duplicate key"),
            (BASE.replace("inputs = { source", "inputz = { source"), "unknown field `inputz`"),
            (format!("[pipeline]\nname = \"../../escaped\"\n{BASE}"), "pipeline name \"../../escaped\""),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
    }

    #[test]
    fn cycles_are_named() {
        let text = r#"
[stages.a]
run = ["x", "{in.i}", "{out.o}"]
inputs = { i = "b.o" }
outputs = { o = "json" }
[stages.b]
run = ["x", "{in.i}", "{out.o}"]
inputs = { i = "a.o" }
outputs = { o = "json" }
"#;
        let err = parse(text).unwrap_err().to_string();
        assert!(err.contains("cycle") && err.contains("a -> b -> a") || err.contains("b -> a -> b"), "{err}");
    }

    #[test]
    fn ranks_come_from_numbers_or_vars_and_are_checked() {
        let text = r#"
[vars]
ranks = 3
[stages.a]
run = ["x", "{out.o}"]
outputs = { o = "json" }
ranks = "{vars.ranks}"
launcher = "torchrun"
[stages.b]
run = ["x", "{out.o}"]
outputs = { o = "json" }
"#;
        let p = parse(text).unwrap();
        assert_eq!((p.stage("a").unwrap().ranks, p.stage("a").unwrap().launcher), (3, Launcher::Torchrun));
        assert_eq!((p.stage("b").unwrap().ranks, p.stage("b").unwrap().launcher), (1, Launcher::Local));
        let p = Pipeline::parse(text, Path::new("/tmp/p/pipe.toml"), &["ranks=2".into()]).unwrap();
        assert_eq!(p.stage("a").unwrap().ranks, 2);
        let cases = [
            (text.replace("ranks = 3", "ranks = 0"), "ranks = 0: expected a positive integer"),
            (text.replace("ranks = 3", "ranks = \"two\""), "ranks = \"two\": expected a positive integer"),
            (text.replace("\"torchrun\"", "\"mpirun\""), "launcher = \"mpirun\""),
            (BASE.replace("params = { seed", "ranks = 2\nparams = { seed"), "stage `resample`: built-in stage `resample` cannot run on several ranks"),
        ];
        for (text, expected) in cases {
            let err = format!("{:#}", parse(&text).unwrap_err());
            assert!(err.contains(expected), "expected `{expected}` in: {err}");
        }
        assert_eq!(parse(&BASE.replace("params = { seed", "ranks = 1\nparams = { seed")).unwrap().stage("resample").unwrap().ranks, 1);
    }

    #[test]
    fn command_placeholders_must_be_declared() {
        let text = r#"
[stages.a]
run = ["x", "{in.missing}", "{out.o}"]
outputs = { o = "json" }
"#;
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(err.contains("{in.missing}"), "{err}");
    }

    #[test]
    fn a_gathering_input_reads_every_instance_of_a_sweep() {
        let text = r#"
[stages.a]
run = ["x", "{params.k}", "{out.o}"]
outputs = { o = "json" }
params = { k = 1 }
matrix = { k = [1, 2] }
[stages.b]
run = ["x", "{in.i}", "{out.o}"]
inputs = { i = "a.o" }
outputs = { o = "json" }
[stages.all]
run = ["x", "--in={in.r}", "--name=b {point.r}", "{out.o}"]
inputs = { r = "b[*].o" }
outputs = { o = "json" }
"#;
        let p = parse(text).unwrap();
        let all = p.stage("all").unwrap();
        let inputs: Vec<String> = all.inputs.iter().map(|(n, r)| format!("{n}={r}")).collect();
        assert_eq!(inputs, ["r[k=1]=b[k=1].o", "r[k=2]=b[k=2].o"]);
        assert_eq!(all.gathers["r"], [Gathered { input: "r[k=1]".into(), point: "k=1".into() }, Gathered { input: "r[k=2]".into(), point: "k=2".into() }]);
        assert_eq!(p.stages.last().unwrap().name, "all", "after every instance it reads");
        let err = |t: String| format!("{:#}", parse(&t).unwrap_err());
        assert!(err(text.replace("b[*].o", "c[*].o")).contains("there is no stage `c`"));
        assert!(err(text.replace("matrix = { k = [1, 2] }", "")).contains("`b` is not swept"));
        assert!(err(text.replace("{point.r}", "{point.q}")).contains("input `q` gathers no sweep"));
        let two = text.replace("inputs = { r = \"b[*].o\" }", "inputs = { r = \"b[*].o\", s = \"a[*].o\" }").replace("{point.r}", "{point.s}{in.r}");
        assert!(err(two).contains("two gathering inputs"));
        let builtin = format!("{BASE}\n{}", text.replace("[stages.all]\nrun = [\"x\", \"--in={in.r}\", \"--name=b {point.r}\", \"{out.o}\"]", "[stages.all]\nuses = \"unpair\"").replace("inputs = { r = \"b[*].o\" }\noutputs = { o = \"json\" }\n", "inputs = { pairs = \"b[*].o\" }\n"));
        assert!(err(builtin).contains("built-in stage `unpair` reads one file per input"));
    }

    #[test]
    fn output_names_cannot_leave_the_work_dir() {
        let text = r#"
[stages.a]
run = ["x", "{out.o}"]
outputs = { "../../escaped" = "json" }
"#;
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(err.contains("output name \"../../escaped\""), "{err}");
    }

    #[test]
    fn set_names_a_var_or_a_stage_param_and_nothing_else() {
        let path = Path::new("/tmp/p/pipe.toml");
        let p = Pipeline::parse(BASE, path, &["resample.seed=-5".into(), "resample.regex=-?\\d+".into()]).unwrap();
        assert_eq!(p.stage("resample").unwrap().params["seed"], serde_json::json!(-5));
        assert_eq!(p.stage("resample").unwrap().params["regex"], serde_json::json!("-?\\d+"));
        let err = format!("{:#}", Pipeline::parse(BASE, path, &["sed=4".into()]).unwrap_err());
        assert!(err.contains("no variable `sed`") && err.contains("did you mean `seed`"), "{err}");
        let err = format!("{:#}", Pipeline::parse(BASE, path, &["nosuch.seed=4".into()]).unwrap_err());
        assert!(err.contains("no variable `nosuch.seed`"), "{err}");
    }

    #[test]
    fn command_params_must_be_used() {
        let text = r#"
[stages.a]
run = ["x", "{out.o}", "{params.used}"]
outputs = { o = "json" }
params = { used = 1, forgotten = 2 }
"#;
        let err = format!("{:#}", parse(text).unwrap_err());
        assert!(err.contains("param `forgotten`"), "{err}");
    }
}
