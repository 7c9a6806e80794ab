//! Running a pipeline: cache keys, freshness, and execution of stages on a `dagrs` graph.
//!
//! A stage's key is the blake3 of its [`KeyParts`]: program identity, resolved params, content
//! hashes of its inputs and its declared outputs. Keys of downstream stages are computed from
//! the actual hashes of upstream outputs, so a rerun upstream that produces identical bytes
//! leaves its descendants cached.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use async_trait::async_trait;
use dagrs::{Action, Content, DefaultNode, EnvVar, Graph, InChannels, Node, NodeTable, OutChannels, Output};

use crate::cache::{Cache, Entry, Lookup, StoredOutput, LOG_FILE};
use crate::hashing::{self, HashMemo};
use crate::manifest::{self, Identity, KeyParts, Manifest, OutputRecord, StageRecord, Status};
use crate::pipeline::{self, Executor, InputRef, Launcher, Pipeline, Stage, StageKind};
use crate::progress::Progress;
use crate::schema;

/// Directory of the work dir, passed to stages as `HALO_STAGE_CACHE_DIR`, where a stage keeps a
/// cache of its own that outlives its runs (the judge's answers); `halo gc` empties it.
pub const STAGE_CACHE_DIR: &str = "stage-cache";
/// Directory of the work dir under which stages stream live metrics (`HALO_TRACKING_DIR` =
/// `tracking/PIPELINE/STAGE-KEY8`; see [`crate::tracking`]).
pub const TRACKING_DIR: &str = "tracking";

/// Which stages a run considers and forces.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Run only these stages (their upstream must be fresh in the cache).
    pub only: Vec<String>,
    /// Rerun these stages and everything downstream of them.
    pub from: Vec<String>,
    /// Rerun these stages even if cached.
    pub force: Vec<String>,
    /// At most this many stages execute at once (default: every stage whose inputs are ready).
    pub jobs: Option<usize>,
}

/// What would happen to a stage, judged from the cache without running anything.
#[derive(Debug, Clone)]
pub enum Plan {
    /// Up to date: this cache entry is used.
    Fresh(Entry),
    /// Must run, and why.
    Run(String),
    /// Its key depends on an upstream stage that must run first.
    AfterUpstream(String),
}

/// A pipeline bound to its cache, its previous manifest and the hash memo.
pub struct Workspace {
    /// The pipeline.
    pub pipeline: Pipeline,
    /// Its cache.
    pub cache: Cache,
    /// The latest manifest, if the pipeline ran before.
    pub previous: Option<Manifest>,
    memo: Mutex<HashMemo>,
}

/// An exclusive lock on a work dir, held while a command uses it.
pub struct WorkLock(#[allow(dead_code)] std::fs::File);

impl WorkLock {
    /// Locks `work_dir` (creating it), failing at once if another `halo` holds it.
    pub fn acquire(work_dir: &Path) -> Result<WorkLock> {
        std::fs::create_dir_all(work_dir).with_context(|| format!("creating work dir {}", work_dir.display()))?;
        let path = work_dir.join(".lock");
        let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.try_lock().map_err(|_| anyhow!("another halo process is using {}; wait for it to finish", work_dir.display()))?;
        Ok(WorkLock(file))
    }
}

impl Workspace {
    /// Opens the workspace of a pipeline.
    pub fn open(pipeline: Pipeline) -> Result<Workspace> {
        let cache = Cache::new(&pipeline.work_dir);
        let previous = Manifest::load_lock(&pipeline.work_dir, &pipeline.name)?;
        let memo = Mutex::new(HashMemo::load(&pipeline.work_dir.join("hashes.json")));
        Ok(Workspace { pipeline, cache, previous, memo })
    }

    /// Saves the hash memo.
    pub fn save_memo(&self) -> Result<()> {
        self.memo.lock().expect("memo lock").save()
    }

    fn hash(&self, path: &Path) -> Result<String> {
        self.memo.lock().expect("memo lock").hash(path)
    }

    /// The identity of a stage's program.
    pub fn identity(&self, stage: &Stage) -> Result<Identity> {
        match &stage.kind {
            StageKind::Builtin(name) => {
                let path = builtin_binary(name)?;
                Ok(Identity::Builtin { binary: format!("halo-{name}"), hash: self.hash(&path)? })
            }
            StageKind::Command(argv) => {
                let mut files = BTreeMap::new();
                for arg in argv.iter().filter(|a| pipeline::placeholders(a).is_empty()) {
                    let path = self.pipeline.dir.join(arg);
                    if arg.contains(['/', '.']) && path.is_file() {
                        files.insert(arg.clone(), self.hash(&path)?);
                    }
                }
                Ok(Identity::Command { argv: argv.clone(), version: stage.version.clone(), files })
            }
        }
    }

    /// Path of an input, given the entries of finished upstream stages.
    pub fn input_path(&self, input: &InputRef, upstream: &BTreeMap<String, Entry>) -> Result<PathBuf> {
        match input {
            InputRef::File(path) => Ok(path.clone()),
            InputRef::Stage { stage, output } => {
                let entry = upstream.get(stage).ok_or_else(|| anyhow!("stage `{stage}` has not produced its outputs"))?;
                self.cache.output_path(entry, output).ok_or_else(|| anyhow!("stage `{stage}` has no output `{output}`"))
            }
        }
    }

    /// The key parts of a stage, given the entries of its finished upstream stages.
    pub fn key_parts(&self, stage: &Stage, upstream: &BTreeMap<String, Entry>) -> Result<KeyParts> {
        let mut inputs = BTreeMap::new();
        for (name, input) in &stage.inputs {
            let hash = match input {
                InputRef::File(path) => self.hash(path).with_context(|| format!("input `{name}` of stage `{}`", stage.name))?,
                InputRef::Stage { stage: from, output } => upstream
                    .get(from)
                    .and_then(|e| e.outputs.get(output))
                    .map(|o| o.hash.clone())
                    .ok_or_else(|| anyhow!("stage `{from}` has not produced `{output}`"))?,
            };
            inputs.insert(name.clone(), hash);
        }
        Ok(KeyParts {
            identity: self.identity(stage)?,
            params: stage.params.clone(),
            inputs,
            outputs: stage.outputs.iter().map(|(n, s)| (n.clone(), s.name.to_string())).collect(),
            ranks: keyed_ranks(stage)?,
        })
    }

    /// Decides whether a stage with these key parts can use the cache.
    pub fn decide(&self, stage: &Stage, parts: &KeyParts, forced: bool) -> Plan {
        if forced {
            return Plan::Run("forced".into());
        }
        match self.cache.lookup(&parts.key(), false) {
            Lookup::Valid(entry) => Plan::Fresh(entry),
            Lookup::Corrupt(why) => Plan::Run(format!("cache entry corrupt ({why}); rebuilding")),
            Lookup::Missing => {
                let prev = self.previous.as_ref().and_then(|m| m.stage(&stage.name)).and_then(|r| r.parts.as_ref());
                Plan::Run(match prev {
                    None => "first run".into(),
                    Some(prev) => {
                        let why = manifest::explain_change(prev, parts);
                        if why.is_empty() { "no cache entry".into() } else { why.join("; ") }
                    }
                })
            }
        }
    }

    /// Judges every stage from the cache alone, in pipeline order (for `status`, `--dry-run`
    /// and the upstream of `--only`). Returns the plan and, when computable, the key parts.
    pub fn analyze(&self, forced: &BTreeSet<String>) -> Vec<(String, Option<KeyParts>, Plan)> {
        let mut fresh: BTreeMap<String, Entry> = BTreeMap::new();
        let mut out = Vec::new();
        for stage in &self.pipeline.stages {
            let waiting = stage.upstream().into_iter().find(|u| !fresh.contains_key(*u));
            let (parts, plan) = match waiting {
                Some(u) => (None, Plan::AfterUpstream(u.to_string())),
                None => match self.key_parts(stage, &fresh) {
                    Err(e) => (None, Plan::Run(format!("{e:#}"))),
                    Ok(parts) => {
                        let plan = self.decide(stage, &parts, forced.contains(&stage.name));
                        (Some(parts), plan)
                    }
                },
            };
            if let Plan::Fresh(entry) = &plan {
                fresh.insert(stage.name.clone(), entry.clone());
            }
            out.push((stage.name.clone(), parts, plan));
        }
        out
    }

    /// Checks every built-in stage's params against the flags of its binary (from `--help`),
    /// so a misspelt param fails before anything runs, not after its upstream stages did. A
    /// binary that cannot be found is left to fail when its stage runs.
    pub fn check_params(&self) -> Result<()> {
        for stage in &self.pipeline.stages {
            if let StageKind::Builtin(name) = &stage.kind {
                if let Ok(binary) = builtin_binary(name) {
                    crate::stages::check_params(&stage.name, &stage.params, &binary)?;
                }
            }
        }
        Ok(())
    }

    /// Runs the pipeline (or the selected part of it) and writes the manifest.
    pub async fn run(self, options: &RunOptions) -> Result<Manifest> {
        let started = Instant::now();
        let started_unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs_f64();
        let mut forced = self.pipeline.with_descendants(&options.from)?;
        for f in &options.force {
            forced.insert(self.pipeline.stage(f)?.name.clone());
        }
        let selected: BTreeSet<String> = if options.only.is_empty() {
            self.pipeline.stages.iter().map(|s| s.name.clone()).collect()
        } else {
            options.only.iter().map(|n| Ok(self.pipeline.stage(n)?.name.clone())).collect::<Result<_>>()?
        };
        // Upstream stages outside the selection must be fresh; their entries seed the run.
        let mut seeded = BTreeMap::new();
        if !options.only.is_empty() {
            for (name, _, plan) in self.analyze(&BTreeSet::new()) {
                if selected.contains(&name) {
                    continue;
                }
                let needed = self.pipeline.stages.iter().any(|s| selected.contains(&s.name) && s.upstream().contains(name.as_str()));
                match plan {
                    Plan::Fresh(entry) => {
                        seeded.insert(name, entry);
                    }
                    Plan::Run(why) | Plan::AfterUpstream(why) if needed => {
                        bail!("--only: stage `{name}`, an input of the selection, is not up to date ({why}); run it first")
                    }
                    _ => {}
                }
            }
        }
        let ctx = Arc::new(RunContext {
            ws: self,
            forced,
            entries: Mutex::new(seeded),
            records: Mutex::new(BTreeMap::new()),
            progress: Progress::new(),
            slots: tokio::sync::Semaphore::new(options.jobs.unwrap_or(tokio::sync::Semaphore::MAX_PERMITS).max(1)),
            key_locks: Mutex::new(BTreeMap::new()),
        });
        run_graph(&ctx, &selected).await?;
        let ctx = Arc::try_unwrap(ctx).map_err(|_| anyhow!("run context still shared"))?;
        ctx.ws.save_memo()?;
        let mut records = ctx.records.into_inner().expect("records lock");
        let stages: Vec<StageRecord> = ctx
            .ws
            .pipeline
            .stages
            .iter()
            .map(|s| {
                records.remove(&s.name).unwrap_or_else(|| {
                    let prev = ctx.ws.previous.as_ref().and_then(|m| m.stage(&s.name)).cloned();
                    StageRecord { status: Status::NotRun, ..prev.unwrap_or_else(|| empty_record(&s.name)) }
                })
            })
            .collect();
        let ok = stages.iter().all(|r| !matches!(r.status, Status::Failed | Status::Skipped));
        let manifest = Manifest {
            pipeline: ctx.ws.pipeline.name.clone(),
            file: ctx.ws.pipeline.path.clone(),
            halo_version: env!("CARGO_PKG_VERSION").to_string(),
            started_unix,
            wall_s: started.elapsed().as_secs_f64(),
            overrides: ctx.ws.pipeline.overrides.clone(),
            ok,
            stages,
        };
        manifest.save(&ctx.ws.pipeline.work_dir)?;
        Ok(manifest)
    }
}

fn empty_record(name: &str) -> StageRecord {
    StageRecord {
        name: name.to_string(),
        status: Status::NotRun,
        reason: None,
        key: None,
        parts: None,
        outputs: BTreeMap::new(),
        duration_s: 0.0,
    }
}

/// Finds the binary of a built-in stage: `$HALO_BIN_DIR`, the directory of the running
/// executable, then `PATH`.
pub fn builtin_binary(name: &str) -> Result<PathBuf> {
    let file = format!("halo-{name}");
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("HALO_BIN_DIR") {
        dirs.push(dir.into());
    }
    if let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)) {
        dirs.push(dir);
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.iter()
        .map(|d| d.join(&file))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("cannot find the binary `{file}` of built-in stage `{name}` (build it with `cargo build --release --workspace`)"))
}

/// The rank count as far as it can change a stage's results: built-in stages whose sharded
/// output equals a single process's ([`crate::stages::Ranks::Same`]) leave it out of the key.
fn keyed_ranks(stage: &Stage) -> Result<usize> {
    Ok(match &stage.kind {
        StageKind::Builtin(name) if crate::stages::builtin(name)?.ranks == crate::stages::Ranks::Same => 1,
        _ => stage.ranks,
    })
}

struct RunContext {
    ws: Workspace,
    forced: BTreeSet<String>,
    /// Entries of finished stages (cached or ran), by stage.
    entries: Mutex<BTreeMap<String, Entry>>,
    records: Mutex<BTreeMap<String, StageRecord>>,
    progress: Progress,
    /// One permit per stage allowed to execute at once (`--jobs`).
    slots: tokio::sync::Semaphore,
    /// One lock per cache key, held while a stage with that key is decided and executed.
    key_locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

struct StageAction {
    ctx: Arc<RunContext>,
    index: usize,
}

#[async_trait]
impl Action for StageAction {
    async fn run(&self, inputs: &mut InChannels, outputs: &mut OutChannels, _env: Arc<EnvVar>) -> Output {
        // Upstream nodes send one message when they finish, whatever their outcome.
        let _ = inputs.map(|_| ()).await;
        let record = run_stage(self.ctx.clone(), self.index).await;
        self.ctx.progress.finish(record.1, &record.0);
        self.ctx.records.lock().expect("records lock").insert(record.0.name.clone(), record.0);
        outputs.broadcast(Content::new(())).await;
        Output::empty()
    }
}

async fn run_graph(ctx: &Arc<RunContext>, selected: &BTreeSet<String>) -> Result<()> {
    if selected.is_empty() {
        return Ok(());
    }
    let mut table = NodeTable::default();
    let mut graph = Graph::new();
    let mut ids = BTreeMap::new();
    for (index, stage) in ctx.ws.pipeline.stages.iter().enumerate().filter(|(_, s)| selected.contains(&s.name)) {
        let node = DefaultNode::with_action(stage.name.clone(), StageAction { ctx: ctx.clone(), index }, &mut table);
        ids.insert(stage.name.clone(), node.id());
        graph.add_node(node).map_err(|e| anyhow!("building the stage graph: {e}"))?;
    }
    for stage in ctx.ws.pipeline.stages.iter().filter(|s| selected.contains(&s.name)) {
        let downstream = ids[&stage.name];
        for up in stage.upstream().into_iter().filter(|u| selected.contains(*u)) {
            graph.add_edge(ids[up], vec![downstream]).map_err(|e| anyhow!("building the stage graph: {e}"))?;
        }
    }
    graph.set_env(EnvVar::new(table));
    graph.async_start().await.map_err(|e| anyhow!("running the stage graph: {e}"))?;
    Ok(())
}

/// Runs (or takes from the cache) one stage; never panics on stage errors, which end up in
/// the record.
async fn run_stage(ctx: Arc<RunContext>, index: usize) -> (StageRecord, Option<indicatif::ProgressBar>) {
    let stage = &ctx.ws.pipeline.stages[index];
    let started = Instant::now();
    let mut record = empty_record(&stage.name);
    let failed_upstream = {
        let records = ctx.records.lock().expect("records lock");
        stage.upstream().into_iter().find(|u| records.get(*u).is_some_and(|r| matches!(r.status, Status::Failed | Status::Skipped)))
            .map(str::to_string)
    };
    if let Some(up) = failed_upstream {
        record.status = Status::Skipped;
        record.reason = Some(format!("upstream stage `{up}` failed"));
        return (record, None);
    }
    let upstream = ctx.entries.lock().expect("entries lock").clone();
    let prepared = {
        let ctx = ctx.clone();
        let upstream = upstream.clone();
        tokio::task::spawn_blocking(move || {
            let stage = &ctx.ws.pipeline.stages[index];
            let parts = ctx.ws.key_parts(stage, &upstream)?;
            let plan = ctx.ws.decide(stage, &parts, ctx.forced.contains(&stage.name));
            anyhow::Ok((parts, plan))
        })
        .await
        .map_err(|e| anyhow!("{e}"))
        .and_then(|r| r)
    };
    let (parts, plan) = match prepared {
        Ok(p) => p,
        Err(e) => {
            record.status = Status::Failed;
            record.reason = Some(format!("{e:#}"));
            record.duration_s = started.elapsed().as_secs_f64();
            return (record, None);
        }
    };
    let key = parts.key();
    record.key = Some(key.clone());
    record.parts = Some(parts.clone());
    // Two stages of one run can share a key (sweep points whose inputs came out identical):
    // one executes while the other waits, then finds the result in the cache.
    let key_lock = ctx.key_locks.lock().expect("key locks").entry(key.clone()).or_default().clone();
    let _same_key = key_lock.lock().await;
    let plan = match plan {
        Plan::Run(_) | Plan::AfterUpstream(_) if !ctx.forced.contains(&stage.name) => match ctx.ws.decide(stage, &parts, false) {
            Plan::Fresh(entry) => Plan::Fresh(entry),
            _ => plan,
        },
        plan => plan,
    };
    let (result, bar) = match plan {
        Plan::Fresh(entry) => {
            record.status = Status::Cached;
            (Ok(entry), None)
        }
        Plan::Run(reason) | Plan::AfterUpstream(reason) => {
            let _slot = ctx.slots.acquire().await.expect("the semaphore is never closed");
            let bar = ctx.progress.start(&stage.name, &reason);
            record.reason = Some(reason);
            let result = execute(&ctx, stage, &key, &upstream).await;
            record.status = if result.is_ok() { Status::Ran } else { Status::Failed };
            (result, Some(bar))
        }
    };
    match result {
        Ok(entry) => {
            record.outputs = entry
                .outputs
                .iter()
                .map(|(name, o)| {
                    let path = ctx.ws.cache.entry_dir(&key).join(&o.file);
                    (name.clone(), OutputRecord { path, hash: o.hash.clone(), rows: o.rows })
                })
                .collect();
            ctx.entries.lock().expect("entries lock").insert(stage.name.clone(), entry);
        }
        Err(e) => record.reason = Some(format!("{e:#}")),
    }
    record.duration_s = started.elapsed().as_secs_f64();
    (record, bar)
}

/// The argv of a stage run writing into `temp`.
fn command_line(ws: &Workspace, stage: &Stage, temp: &Path, upstream: &BTreeMap<String, Entry>) -> Result<Vec<String>> {
    let mut inputs = BTreeMap::new();
    for (name, input) in &stage.inputs {
        let path = ws.input_path(input, upstream)?;
        inputs.insert(name.clone(), std::path::absolute(&path).unwrap_or(path).to_string_lossy().into_owned());
    }
    let outputs: BTreeMap<&str, String> = stage
        .outputs
        .iter()
        .map(|(name, def)| (name.as_str(), temp.join(format!("{name}{}", def.format.extension())).to_string_lossy().into_owned()))
        .collect();
    Ok(match &stage.kind {
        StageKind::Builtin(name) => {
            let mut argv = vec![builtin_binary(name)?.to_string_lossy().into_owned()];
            for (name, path) in &inputs {
                argv.extend([format!("--{}", name.replace('_', "-")), path.clone()]);
            }
            for (name, path) in &outputs {
                argv.extend([format!("--{}", name.replace('_', "-")), path.clone()]);
            }
            argv.extend(crate::stages::param_args(&stage.params));
            argv
        }
        StageKind::Command(argv) => {
            // One argument, with `{in.X}` / `{point.X}` of the gathered instance `one` when given.
            let fill = |arg: &str, one: Option<&pipeline::Gathered>| {
                let mut filled = arg.to_string();
                for p in pipeline::placeholders(arg) {
                    let value = match p.split_once('.') {
                        Some(("in", n)) => inputs[one.filter(|_| stage.gathers.contains_key(n)).map_or(n, |g| g.input.as_str())].clone(),
                        Some(("point", _)) => one.expect("checked at parse: {point.X} names a gathering input").point.clone(),
                        Some(("out", n)) => outputs[n].clone(),
                        Some(("params", n)) => match &stage.params[n] {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        },
                        _ => temp.to_string_lossy().into_owned(),
                    };
                    filled = filled.replace(&format!("{{{p}}}"), &value);
                }
                filled
            };
            let mut filled = Vec::new();
            for arg in argv {
                let gathered = pipeline::placeholders(arg).into_iter().find_map(|p| p.strip_prefix("in.").or(p.strip_prefix("point.")).and_then(|n| stage.gathers.get(n)));
                match gathered {
                    Some(instances) => filled.extend(instances.iter().map(|g| fill(arg, Some(g)))),
                    None => filled.push(fill(arg, None)),
                }
            }
            filled
        }
    })
}

/// Runs a stage process into a temporary directory, validates its outputs and commits them
/// to the cache. On any failure the temporary directory is removed and its log kept under
/// `WORK_DIR/logs/STAGE.failed.log`.
async fn execute(ctx: &Arc<RunContext>, stage: &Stage, key: &str, upstream: &BTreeMap<String, Entry>) -> Result<Entry> {
    let ws = &ctx.ws;
    let temp = ws.cache.new_temp(key)?;
    // Scratch space that survives a failed or killed attempt (for resumable stages such as
    // refcache) and is deleted once the stage's result is in the cache.
    let scratch = ws.pipeline.work_dir.join("scratch").join(key);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let started = Instant::now();
    let result = async {
        let argv = command_line(ws, stage, &temp, upstream)?;
        tracing::debug!(stage = %stage.name, ranks = stage.ranks, ?argv, "starting");
        match ws.pipeline.executor {
            Executor::Local => launch(ws, stage, key, &argv, &temp, &scratch).await?,
            Executor::Slurm => crate::slurm::launch(ws, &ctx.progress, stage, key, &argv, &temp, &scratch).await?,
        }
        let (ctx2, stage_name, temp2) = (ctx.clone(), stage.name.clone(), temp.clone());
        let key = key.to_string();
        let duration_s = started.elapsed().as_secs_f64();
        let entry = tokio::task::spawn_blocking(move || {
            let stage = ctx2.ws.pipeline.stage(&stage_name)?;
            let mut outputs = BTreeMap::new();
            for (name, def) in &stage.outputs {
                let file = format!("{name}{}", def.format.extension());
                let path = temp2.join(&file);
                if !path.exists() {
                    bail!("stage `{stage_name}` exited 0 but did not write output `{name}` (expected at {})", path.display());
                }
                let rows = schema::validate_file(def, &path)
                    .with_context(|| format!("stage `{stage_name}` output `{name}` does not match schema `{}`", def.name))?;
                let hash = hashing::hash_path(&path)?;
                outputs.insert(name.clone(), StoredOutput { file, schema: def.name.to_string(), hash, stamp: hashing::stamp(&path)?, rows });
            }
            let entry = Entry { stage: stage_name, key, duration_s, outputs };
            ctx2.ws.cache.commit(&temp2, &entry)?;
            anyhow::Ok(entry)
        })
        .await??;
        Ok(entry)
    }
    .await;
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    if result.is_err() && temp.exists() {
        let logs = ws.pipeline.work_dir.join("logs");
        let _ = std::fs::create_dir_all(&logs);
        for rank in 0..stage.ranks {
            let failed = match rank {
                0 => format!("{}.failed.log", stage.name),
                r => format!("{}.rank{r}.failed.log", stage.name),
            };
            let _ = std::fs::rename(temp.join(rank_log(rank)), logs.join(failed));
        }
        let _ = std::fs::remove_dir_all(&temp);
    }
    result
}

/// The log file of a rank inside the stage's directory: rank 0 writes the stage log, rank r
/// `stage.rankR.log` beside it.
pub(crate) fn rank_log(rank: usize) -> String {
    match rank {
        0 => LOG_FILE.to_string(),
        r => format!("stage.rank{r}.log"),
    }
}

/// Where a run of `stage` with cache key `key` streams its metrics:
/// `WORK_DIR/tracking/PIPELINE/STAGE-KEY8`, one TensorBoard run per distinct configuration.
pub fn tracking_dir(ws: &Workspace, stage: &Stage, key: &str) -> PathBuf {
    ws.pipeline.work_dir.join(TRACKING_DIR).join(&ws.pipeline.name).join(format!("{}-{}", stage.name, &key[..8.min(key.len())]))
}

/// Starts the processes of a stage and waits for all of them. With `ranks = N` (N > 1) and the
/// local launcher, N processes get the torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE,
/// LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1, MASTER_PORT = a free port, and OMP_NUM_THREADS=1
/// unless set, as torchrun does); the first rank to fail gets the others killed and its exit
/// status and log tail make the error. A single process gets RANK=0 and WORLD_SIZE=1. With
/// `launcher = "torchrun"` one `torchrun --no-python` process starts the ranks instead.
async fn launch(ws: &Workspace, stage: &Stage, key: &str, argv: &[String], temp: &Path, scratch: &Path) -> Result<()> {
    let world = stage.ranks;
    let (argv, processes): (Vec<String>, usize) = match stage.launcher {
        Launcher::Local => (argv.to_vec(), world),
        Launcher::Torchrun => {
            let mut wrapped: Vec<String> =
                ["torchrun", "--standalone", "--nnodes", "1", "--nproc-per-node", &world.to_string(), "--no-python"]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
            wrapped.extend(argv.iter().cloned());
            (wrapped, 1)
        }
    };
    let port = if processes > 1 { free_port()? } else { 0 };
    let mut running = tokio::task::JoinSet::new();
    let mut pids = BTreeMap::new();
    for rank in 0..processes {
        let log_path = temp.join(rank_log(rank));
        let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let mut command = tokio::process::Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .current_dir(&ws.pipeline.dir)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true);
        stage_env(&mut command, ws, stage, key, temp, scratch);
        if stage.launcher == Launcher::Local {
            command
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("WORLD_SIZE", world.to_string())
                .env("LOCAL_WORLD_SIZE", world.to_string());
            if world > 1 {
                command.env("MASTER_ADDR", "127.0.0.1").env("MASTER_PORT", port.to_string());
                // As torchrun does: N ranks on one machine would oversubscribe its cores.
                if std::env::var_os("OMP_NUM_THREADS").is_none() {
                    command.env("OMP_NUM_THREADS", "1");
                }
            } else {
                command.env_remove("MASTER_ADDR").env_remove("MASTER_PORT");
            }
        }
        die_with_parent(&mut command, if stage.launcher == Launcher::Torchrun { libc::SIGTERM } else { libc::SIGKILL });
        let mut child = match command.spawn() {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && stage.launcher == Launcher::Torchrun => {
                bail!("stage `{}`: launcher = \"torchrun\" but `torchrun` is not on PATH (it comes with PyTorch: pip install torch)", stage.name)
            }
            Err(e) => return Err(e).with_context(|| format!("stage `{}`: cannot start `{}`", stage.name, argv[0])),
        };
        if let Some(pid) = child.id() {
            pids.insert(rank, pid);
        }
        running.spawn(async move { (rank, child.wait().await) });
    }
    let mut failure: Option<(usize, String)> = None;
    while let Some(joined) = running.join_next().await {
        let (rank, status) = joined.map_err(|e| anyhow!("waiting for stage `{}`: {e}", stage.name))?;
        pids.remove(&rank);
        let status = status.with_context(|| format!("waiting for stage `{}` rank {rank}", stage.name))?;
        if !status.success() && failure.is_none() {
            failure = Some((rank, describe_exit(&status)));
            for pid in pids.values() {
                // SAFETY: kill(2) has no memory-safety preconditions; these children are not
                // reaped yet, so their pids cannot have been reused.
                unsafe {
                    libc::kill(*pid as libc::pid_t, libc::SIGKILL);
                }
            }
        }
    }
    let disk = low_disk_note(&ws.pipeline.work_dir);
    match failure {
        None => Ok(()),
        Some((_, how)) if processes == 1 => {
            bail!("stage `{}` failed ({how}){disk}; last lines of its output:\n{}", stage.name, tail(&temp.join(LOG_FILE), 20))
        }
        Some((rank, how)) => bail!(
            "stage `{}` failed (rank {rank} of {world}: {how}; the other ranks were stopped){disk}; last lines of rank {rank}'s output:\n{}",
            stage.name,
            tail(&temp.join(rank_log(rank)), 20)
        ),
    }
}

/// Sets what every stage process finds in its environment, whichever executor starts it:
/// HALO_STAGE, HALO_OUT_DIR, HALO_SCRATCH_DIR, HALO_STAGE_CACHE_DIR and HALO_PARAMS.
pub(crate) fn stage_env(command: &mut tokio::process::Command, ws: &Workspace, stage: &Stage, key: &str, temp: &Path, scratch: &Path) {
    command
        .env("HALO_STAGE", &stage.name)
        .env("HALO_OUT_DIR", temp)
        .env("HALO_SCRATCH_DIR", scratch)
        .env("HALO_STAGE_CACHE_DIR", ws.pipeline.work_dir.join(STAGE_CACHE_DIR))
        .env(crate::tracking::TRACKING_DIR_ENV, tracking_dir(ws, stage, key))
        .env("HALO_PARAMS", serde_json::Value::Object(stage.params.clone()).to_string())
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
}

/// A TCP port free on the loopback interface right now, for the ranks' rendezvous. It is
/// taken below the kernel's ephemeral range (`ip_local_port_range`): a port the kernel hands
/// out (`bind` to port 0) can go to another process's outgoing connection before rank 0 binds
/// it, and the other ranks then wait out the rendezvous timeout for a store that never came
/// up. Tried from a start that differs per process and call, so concurrent callers rarely
/// meet; an ephemeral port only when none below is free.
pub fn free_port() -> Result<u16> {
    const FIRST: u32 = 10_000;
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok().and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok());
    let below = ephemeral.unwrap_or(32_768).clamp(FIRST + 1, 65_536) - FIRST;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let start = (std::process::id().wrapping_mul(2_654_435_761) ^ nanos) % below;
    for i in 0..below {
        let port = (FIRST + (start + i) % below) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).context("finding a free port for the ranks' rendezvous")?;
    Ok(listener.local_addr()?.port())
}

/// Asks the kernel to send `signal` to the stage process if `halo` itself dies, so a killed
/// run leaves no orphan writing into the work dir (SIGKILL for stage processes; SIGTERM for
/// torchrun, which then stops its workers, while a SIGKILLed torchrun would orphan them).
pub(crate) fn die_with_parent(command: &mut tokio::process::Command, signal: libc::c_int) {
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        command.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, signal);
            Ok(())
        });
    }
}

pub(crate) fn describe_exit(status: &std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(9)) => "killed by signal 9 (SIGKILL)".into(),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => status.to_string(),
    }
}

/// Free bytes below which a failed stage's message points at the disk.
const LOW_DISK_BYTES: u64 = 64 << 20;

/// `" (the work dir's file system has N bytes free: full?)"` when little space is left on the
/// file system of `dir`, else nothing: a stage that fails on a full disk often cannot even write
/// its error to its log.
pub(crate) fn low_disk_note(dir: &Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else { return String::new() };
    // SAFETY: statvfs writes only into the zeroed struct we pass; the path is NUL-terminated.
    let free = unsafe {
        let mut stat: libc::statvfs = std::mem::zeroed();
        (libc::statvfs(path.as_ptr(), &mut stat) == 0).then(|| stat.f_bavail as u64 * stat.f_frsize as u64)
    };
    match free {
        Some(bytes) if bytes < LOW_DISK_BYTES => format!(" (the work dir's file system has {bytes} bytes free: is the disk full?)"),
        _ => String::new(),
    }
}

/// The last `n` lines of a text file (lossy UTF-8).
pub(crate) fn tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let shown = lines[lines.len().saturating_sub(n)..].iter().map(|l| format!("  | {l}")).collect::<Vec<_>>();
    if shown.is_empty() { "  | (no output)".into() } else { shown.join("\n") }
}

#[cfg(test)]
mod tests {
    /// The rendezvous port lies below the kernel's ephemeral range (no outgoing connection
    /// can take it) and can be bound.
    #[test]
    fn the_rendezvous_port_is_free_and_outside_the_ephemeral_range() {
        let range = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
        let ephemeral: u16 = range.split_whitespace().next().unwrap().parse().unwrap();
        for _ in 0..20 {
            let port = super::free_port().unwrap();
            assert!((10_000..ephemeral).contains(&port), "port {port}, ephemeral range from {ephemeral}");
            drop(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap());
        }
    }
}
