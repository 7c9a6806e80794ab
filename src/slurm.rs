//! The Slurm executor: each stage runs as one Slurm job, started with
//! `srun --job-name=halo-PIPELINE-STAGE --ntasks=RANKS [resources] --kill-on-bad-exit=1 --chdir=DIR
//! --output=TEMP/stage.rank%t.log ARGV`.
//!
//! `srun` blocks until the job ends and exits with the job's exit code. Its own messages (run with
//! `--verbose`) give the job id and state, which go to the progress display and to the end of the
//! stage log. The tasks get Slurm's environment (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID,
//! SLURM_JOB_NODELIST), which `halo-dist` reads, plus MASTER_PORT (a free port) for multi-rank
//! stages; RANK, WORLD_SIZE and MASTER_ADDR are removed, so rank 0's host is the job's first node.
//! Outputs are written by the job into the run's temporary directory inside the work dir (a shared
//! file system on a real cluster), then checked and committed by the runner as with the local
//! executor: cache keys and outputs do not depend on the executor.
//!
//! Cancelling: `srun` runs in its own process group and gets SIGTERM when `halo` dies
//! (PR_SET_PDEATHSIG), on which it cancels its job; a launch abandoned by the runner SIGTERMs
//! `srun` and `scancel`s the job.

use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

use crate::pipeline::{Launcher, Stage};
use crate::progress::Progress;
use crate::runner::{self, Workspace};

/// What a stage's Slurm job asks for (`resources = { ... }` on a stage). Only the Slurm executor
/// reads it; it is not part of the cache key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    /// `--partition`.
    pub partition: Option<String>,
    /// `--nodes`.
    pub nodes: Option<u64>,
    /// `--gpus-per-node`.
    pub gpus_per_node: Option<u64>,
    /// `--cpus-per-task`.
    pub cpus: Option<u64>,
    /// `--mem` (a number of MiB or Slurm's `16G` form).
    pub mem: Option<String>,
    /// `--time` (minutes or Slurm's `HH:MM:SS`, `D-HH:MM` forms).
    pub time: Option<String>,
}

/// The keys `resources` takes.
const RESOURCE_KEYS: [&str; 6] = ["partition", "nodes", "gpus_per_node", "cpus", "mem", "time"];

impl Resources {
    /// Reads a stage's `resources` table (after variable substitution), refusing unknown keys
    /// and values of the wrong kind, naming them.
    pub fn parse(value: Value) -> Result<Resources> {
        let Value::Object(map) = value else { bail!("resources = {value}: expected a table such as {{ cpus = 4, mem = \"16G\" }}") };
        let mut unknown: Vec<&str> = map.keys().map(String::as_str).filter(|k| !RESOURCE_KEYS.contains(k)).collect();
        unknown.sort_unstable();
        if !unknown.is_empty() {
            bail!("resources: unknown key(s) {} (known: {})", unknown.join(", "), RESOURCE_KEYS.join(", "));
        }
        let count = |key: &str| -> Result<Option<u64>> {
            map.get(key)
                .map(|v| match v {
                    Value::Number(n) => n.as_u64().filter(|n| *n > 0),
                    Value::String(s) => s.trim().parse::<u64>().ok().filter(|n| *n > 0),
                    _ => None,
                }
                .ok_or_else(|| anyhow!("resources.{key} = {v}: expected a positive integer")))
                .transpose()
        };
        let text = |key: &str| -> Result<Option<String>> {
            map.get(key)
                .map(|v| match v {
                    Value::String(s) if !s.trim().is_empty() && !s.contains(char::is_whitespace) => Ok(s.clone()),
                    Value::Number(n) if n.as_u64().is_some_and(|n| n > 0) => Ok(n.to_string()),
                    _ => Err(anyhow!("resources.{key} = {v}: expected a non-empty word or a positive number")),
                })
                .transpose()
        };
        Ok(Resources {
            partition: text("partition")?,
            nodes: count("nodes")?,
            gpus_per_node: count("gpus_per_node")?,
            cpus: count("cpus")?,
            mem: text("mem")?,
            time: text("time")?,
        })
    }

    /// The `srun` options asking for these resources.
    pub fn srun_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        let mut push = |flag: &str, value: Option<String>| {
            if let Some(v) = value {
                args.push(format!("--{flag}={v}"));
            }
        };
        push("partition", self.partition.clone());
        push("nodes", self.nodes.map(|n| n.to_string()));
        push("gpus-per-node", self.gpus_per_node.map(|n| n.to_string()));
        push("cpus-per-task", self.cpus.map(|n| n.to_string()));
        push("mem", self.mem.clone());
        push("time", self.time.clone());
        args
    }
}

/// The log file pattern of the job's tasks in `temp` (`%t` is the task's rank); rank 0's log
/// is renamed to the stage log afterwards.
fn output_pattern(temp: &Path) -> String {
    format!("{}/stage.rank%t.log", temp.to_string_lossy().replace('%', "%%"))
}

/// The `srun` command line running `argv` as the Slurm job of `stage`, writing into `temp`.
pub fn srun_argv(pipeline: &str, stage: &Stage, dir: &Path, temp: &Path, argv: &[String]) -> Vec<String> {
    let mut srun = vec![
        "srun".to_string(),
        "--verbose".to_string(),
        format!("--job-name=halo-{pipeline}-{}", stage.name),
        format!("--ntasks={}", stage.ranks),
    ];
    srun.extend(stage.resources.srun_args());
    srun.extend([
        "--kill-on-bad-exit=1".to_string(),
        format!("--chdir={}", dir.display()),
        format!("--output={}", output_pattern(temp)),
    ]);
    srun.extend(argv.iter().cloned());
    srun
}

/// What a line of `srun --verbose` says about its job: its id and state.
fn job_event(line: &str) -> Option<(u64, &'static str)> {
    let rest = line.strip_prefix("srun: ")?;
    let (id, state) = if let Some(r) = rest.strip_prefix("jobid ") {
        (r.split(':').next()?, "RUNNING")
    } else if let Some(r) = rest.strip_prefix("job ") {
        let (id, what) = r.split_once(' ')?;
        match what {
            w if w.starts_with("queued") => (id, "PENDING"),
            w if w.starts_with("has been allocated") => (id, "RUNNING"),
            _ => return None,
        }
    } else {
        return None;
    };
    Some((id.trim().parse().ok()?, state))
}

/// The rank `srun` names first as failed, and how, from a line such as
/// `srun: error: node: task 1: Exited with exit code 3`.
fn failed_task(lines: &[String]) -> Option<(usize, String)> {
    lines.iter().find_map(|l| {
        let (rank, how) = l.split_once(": task ")?.1.split_once(':')?;
        Some((rank.trim().parse().ok()?, how.trim().to_string()))
    })
}

/// `JobState` and `ExitCode` of a finished job, as `scontrol show job` reports them (waiting up
/// to 5 s while it is still COMPLETING).
async fn job_state(id: u64) -> Option<(String, String)> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let out = tokio::process::Command::new("scontrol").args(["show", "job", "-o", &id.to_string()]).output().await.ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let field = |name: &str| text.split_whitespace().find_map(|w| w.strip_prefix(name)).map(str::to_string);
        let (state, code) = (field("JobState=")?, field("ExitCode=")?);
        if !matches!(state.as_str(), "COMPLETING" | "RUNNING") || std::time::Instant::now() > deadline {
            return Some((state, code));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// While alive, the job may still run: dropping it (the runner abandoned the stage) SIGTERMs
/// `srun` and `scancel`s the job.
struct Running {
    srun: Option<u32>,
    job: Arc<Mutex<Option<u64>>>,
    finished: bool,
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if let Some(pid) = self.srun {
            // SAFETY: kill(2) has no memory-safety preconditions; srun is not reaped yet.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if let Some(id) = *self.job.lock().expect("job lock") {
            let _ = std::process::Command::new("scancel").arg(id.to_string()).status();
        }
    }
}

/// Runs a stage as a Slurm job and waits for it; on failure the error gives the job id, its
/// state and exit code, the failed rank and the last lines of that rank's log.
pub(crate) async fn launch(ws: &Workspace, progress: &Progress, stage: &Stage, key: &str, argv: &[String], temp: &Path, scratch: &Path) -> Result<()> {
    if stage.launcher == Launcher::Torchrun {
        bail!("stage `{}`: launcher = \"torchrun\" cannot run under the Slurm executor (srun starts the ranks); remove it", stage.name);
    }
    let srun = srun_argv(&ws.pipeline.name, stage, &ws.pipeline.dir, temp, argv);
    tracing::debug!(stage = %stage.name, ?srun, "submitting");
    let mut command = tokio::process::Command::new(&srun[0]);
    command
        .args(&srun[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .process_group(0);
    runner::stage_env(&mut command, ws, stage, key, temp, scratch);
    for name in ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR"] {
        command.env_remove(name);
    }
    if stage.ranks > 1 {
        command.env("MASTER_PORT", runner::free_port()?.to_string());
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            command.env("OMP_NUM_THREADS", "1");
        }
    } else {
        command.env_remove("MASTER_PORT");
    }
    runner::die_with_parent(&mut command, libc::SIGTERM);
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("stage `{}`: the Slurm executor needs `srun` on PATH (Slurm's client commands)", stage.name)
        }
        Err(e) => return Err(e).with_context(|| format!("stage `{}`: cannot start srun", stage.name)),
    };
    let mut running = Running { srun: child.id(), job: Arc::new(Mutex::new(None)), finished: false };
    let stderr = child.stderr.take().context("srun's stderr")?;
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let mut said: Vec<String> = Vec::new();
    let mut shown = None;
    while let Some(line) = lines.next_line().await.with_context(|| format!("reading srun's output for stage `{}`", stage.name))? {
        if let Some((id, state)) = job_event(&line) {
            *running.job.lock().expect("job lock") = Some(id);
            if shown != Some(state) {
                progress.line(&format!("  {}: Slurm job {id} {state}", stage.name));
                shown = Some(state);
            }
        }
        said.push(line);
    }
    let status = child.wait().await.with_context(|| format!("waiting for srun of stage `{}`", stage.name))?;
    running.finished = true;
    let job = *running.job.lock().expect("job lock");
    let rank0 = temp.join("stage.rank0.log");
    let log = temp.join(runner::rank_log(0));
    if rank0.exists() {
        std::fs::rename(&rank0, &log).with_context(|| format!("renaming {} to {}", rank0.display(), log.display()))?;
    }
    let outcome = if status.success() {
        progress.line(&format!("  {}: Slurm job {} COMPLETED", stage.name, job.map_or("?".into(), |j| j.to_string())));
        Ok(())
    } else {
        let how = runner::describe_exit(&status);
        let disk = runner::low_disk_note(&ws.pipeline.work_dir);
        match job {
            None => Err(anyhow!(
                "stage `{}`: srun did not start a Slurm job ({how}){disk}; srun said:\n{}",
                stage.name,
                said.iter().rev().take(20).rev().map(|l| format!("  | {l}")).collect::<Vec<_>>().join("\n")
            )),
            Some(id) => {
                let state = match job_state(id).await {
                    Some((state, code)) => format!("{state}, ExitCode {code}"),
                    None => "state unknown".into(),
                };
                progress.line(&format!("  {}: Slurm job {id} {state}", stage.name));
                let (rank, task) = match failed_task(&said).filter(|(r, _)| *r < stage.ranks) {
                    Some((rank, task)) => (rank, format!("{task}; ")),
                    None => (0, String::new()),
                };
                let log_tail = runner::tail(&temp.join(runner::rank_log(rank)), 20);
                Err(if stage.ranks == 1 {
                    anyhow!("stage `{}` failed (Slurm job {id}: {state}; {task}srun {how}){disk}; last lines of its output:\n{log_tail}", stage.name)
                } else {
                    anyhow!(
                        "stage `{}` failed (Slurm job {id}: {state}; rank {rank} of {}: {task}srun {how}){disk}; last lines of rank {rank}'s output:\n{log_tail}",
                        stage.name,
                        stage.ranks
                    )
                })
            }
        }
    };
    // srun's own lines (job id, nodes, task exits; not the echo of its options) go after rank
    // 0's output in the stage log.
    let mut text = format!("--- srun (Slurm job {}) ---\n", job.map_or("?".into(), |j| j.to_string()));
    let options_end = said.iter().position(|l| l == "srun: end of defined options").map_or(0, |i| i + 1);
    said[options_end..].iter().for_each(|l| text.push_str(&format!("{l}\n")));
    let appended = std::fs::OpenOptions::new().create(true).append(true).open(&log).and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    outcome?;
    appended.with_context(|| format!("writing srun's messages to {}", log.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resources_are_checked_and_become_srun_options() {
        let r = Resources::parse(serde_json::json!({"partition": "gpu", "nodes": 2, "gpus_per_node": "4", "cpus": 8, "mem": "16G", "time": "01:00:00"})).unwrap();
        assert_eq!(
            r.srun_args(),
            ["--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=16G", "--time=01:00:00"]
        );
        assert_eq!(Resources::parse(serde_json::json!({"mem": 2048, "time": 30})).unwrap().srun_args(), ["--mem=2048", "--time=30"]);
        assert!(Resources::parse(serde_json::json!({})).unwrap().srun_args().is_empty());
        let err = |v: Value| Resources::parse(v).unwrap_err().to_string();
        let unknown = err(serde_json::json!({"gpus": 1, "cpu": 2, "mem": "1G"}));
        assert!(unknown.contains("unknown key(s) cpu, gpus (known: partition, nodes, gpus_per_node, cpus, mem, time)"), "{unknown}");
        assert!(err(serde_json::json!({"nodes": 0})).contains("resources.nodes = 0: expected a positive integer"));
        assert!(err(serde_json::json!({"cpus": 1.5})).contains("resources.cpus = 1.5"));
        assert!(err(serde_json::json!({"partition": "a b"})).contains("resources.partition"));
        assert!(err(serde_json::json!("big")).contains("expected a table"));
    }

    #[test]
    fn srun_messages_give_job_ids_states_and_the_failed_rank() {
        assert_eq!(job_event("srun: jobid 17: nodes(1):`vm', cpu counts: 2(x1)"), Some((17, "RUNNING")));
        assert_eq!(job_event("srun: job 18 queued and waiting for resources"), Some((18, "PENDING")));
        assert_eq!(job_event("srun: job 18 has been allocated resources"), Some((18, "RUNNING")));
        assert_eq!(job_event("srun: launching StepId=18.0 on host vm, 2 tasks: [0-1]"), None);
        assert_eq!(job_event("hello jobid 3:"), None);
        let lines = ["srun: launching StepId=1.0".to_string(), "srun: error: vm: task 1: Exited with exit code 3".to_string()];
        assert_eq!(failed_task(&lines), Some((1, "Exited with exit code 3".to_string())));
        assert_eq!(failed_task(&["srun: error: vm: tasks 0-1: Killed".to_string()]), None);
    }

    #[test]
    fn the_task_log_pattern_escapes_percent_signs_of_the_path() {
        assert_eq!(output_pattern(Path::new("/w/a%b")), "/w/a%%b/stage.rank%t.log");
    }
}
