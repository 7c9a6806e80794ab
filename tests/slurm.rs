//! The Slurm executor on a real single-node Slurm cluster started by `ci/slurm.sh` in a temporary
//! directory: the same pipeline gives the same outputs and cache keys as locally; a failing job
//! is reported with its exit code and log tail; a job cancelled with `scancel` and a runner
//! killed with SIGKILL, SIGINT or SIGTERM leave no cache entry and no job.
//!
//! Skipped (visibly) when the cluster cannot be started, unless HALO_REQUIRE_SLURM=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use haloflow::manifest::Status;

/// A Slurm cluster running in a temporary directory, stopped when dropped (also on panic).
struct Cluster {
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts a cluster on free ports, or says why not and returns `None` (panics instead when
    /// HALO_REQUIRE_SLURM=1).
    fn start() -> Option<Cluster> {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<std::net::TcpListener> = (0..2).map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap()).collect();
        let port = |i: usize| ports[i].local_addr().unwrap().port().to_string();
        let (ctld, slurmd) = (port(0), port(1));
        drop(ports);
        let out = Command::new(repo_root().join("ci/slurm.sh"))
            .args(["start", &dir.path().to_string_lossy()])
            .env("SLURM_CTLD_PORT", ctld)
            .env("SLURMD_PORT", slurmd)
            .output()
            .expect("ci/slurm.sh runs");
        let cluster = Cluster { dir };
        if out.status.success() {
            return Some(cluster);
        }
        let why = format!("ci/slurm.sh start failed:\n{}", text(&out));
        if std::env::var("HALO_REQUIRE_SLURM").as_deref() == Ok("1") {
            panic!("HALO_REQUIRE_SLURM=1 but {why}");
        }
        eprintln!("SKIPPED: no Slurm cluster ({why})");
        None
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// A Slurm client command (squeue, scancel) talking to this cluster.
    fn client(&self, program: &str, args: &[&str]) -> String {
        let out = Command::new(program).args(args).env("SLURM_CONF", self.conf()).output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Ids of this cluster's jobs with this name that are pending, running or completing.
    fn jobs(&self, name: &str) -> Vec<String> {
        self.client("squeue", &["-h", "-n", name, "-o", "%i"]).split_whitespace().map(str::to_string).collect()
    }

    /// A `halo` command using this cluster.
    fn halo(&self, args: &[&str]) -> Command {
        let mut cmd = halo(args);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.halo(args).output().unwrap();
        eprintln!("$ halo {}\n{}", args.join(" "), text(&out));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = Command::new(repo_root().join("ci/slurm.sh")).args(["stop", &self.dir.path().to_string_lossy()]).output();
        if let Some(out) = out.ok().filter(|o| !o.status.success()) {
            eprintln!("ci/slurm.sh stop failed: {}", text(&out));
        }
    }
}

/// Writes the upstream stage's output.
const PREP_PY: &str = r#"import json, sys
json.dump({"numbers": [1, 2, 3]}, open(sys.argv[1], "w"))
"#;

/// Each rank (RANK locally, SLURM_PROCID under Slurm) marks itself in the stage's directory and
/// records its pid under `pids` (unless "-"); rank `fail_rank` prints a line and exits 3; the
/// others sleep `sleep` seconds; rank 0 then waits for every rank's mark and writes the output.
const RANK_PY: &str = r#"import json, os, sys, time
inp, out, sleep, fail_rank, pids = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "-1")))
world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "-1")))
d = os.environ["HALO_OUT_DIR"]
open(os.path.join(d, f"mark{rank}"), "w").write("")
if pids != "-":
    open(os.path.join(pids, f"rank{rank}.pid"), "w").write(str(os.getpid()))
print(f"rank {rank} of {world} starts", file=sys.stderr, flush=True)
if rank == fail_rank:
    print(f"rank {rank} gives up", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(sleep)
if rank == 0:
    deadline = time.time() + 60
    while time.time() < deadline and len([f for f in os.listdir(d) if f.startswith("mark")]) < world:
        time.sleep(0.02)
    marks = sorted(f for f in os.listdir(d) if f.startswith("mark"))
    json.dump({"input": json.load(open(inp)), "world": world, "marks": marks, "port": "MASTER_PORT" in os.environ}, open(out, "w"))
"#;

const PIPELINE: &str = r#"
[vars]
sleep = 0
fail_rank = -1
pids = "-"
[stages.prep]
run = ["python3", "prep.py", "{out.o}"]
outputs = { o = "json" }
[stages.ranked]
run = ["python3", "rank.py", "{in.x}", "{out.o}", "{vars.sleep}", "{vars.fail_rank}", "{vars.pids}"]
inputs = { x = "prep.o" }
outputs = { o = "json" }
ranks = 2
resources = { cpus = 1, time = "10" }
"#;

/// Writes the pipeline and its scripts into `dir`; returns the pipeline path and the work dir.
fn setup(dir: &Path) -> (String, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("prep.py"), PREP_PY).unwrap();
    std::fs::write(dir.join("rank.py"), RANK_PY).unwrap();
    std::fs::write(dir.join("p.toml"), PIPELINE).unwrap();
    (dir.join("p.toml").to_string_lossy().into_owned(), dir.join(".halo"))
}

/// Keys and output bytes of every stage of the latest run.
fn results(work: &Path) -> Vec<(String, String, Vec<u8>)> {
    manifest(work, "p")
        .stages
        .into_iter()
        .map(|s| {
            let out = std::fs::read(&s.outputs["o"].path).unwrap();
            (s.name, s.key.unwrap(), out)
        })
        .collect()
}

/// Waits up to `limit` for `done`, failing with `what`.
fn wait_until(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < limit, "{what} did not happen within {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    started.elapsed()
}

/// Whether stage `ranked` would run with these settings, i.e. has no cache entry.
fn would_run(cluster: &Cluster, pipeline: &str, sets: &[&str]) -> bool {
    let mut args = vec!["run", pipeline, "--dry-run"];
    for s in sets {
        args.extend(["--set", s]);
    }
    let out = cluster.run(&args);
    assert!(out.status.success());
    text(&out).contains("would run  ranked")
}

fn alive(pid: &str) -> bool {
    Command::new("ps").args(["-o", "stat=", "-p", pid]).output().map(|o| {
        let stat = String::from_utf8_lossy(&o.stdout).trim().to_string();
        o.status.success() && !stat.is_empty() && !stat.starts_with('Z')
    }).unwrap_or(false)
}

#[test]
fn pipelines_run_as_slurm_jobs() {
    let Some(cluster) = Cluster::start() else { return };
    let root = tempfile::tempdir().unwrap();

    // The same pipeline locally and under Slurm: identical keys and outputs.
    let (local, local_work) = setup(&root.path().join("local"));
    assert!(cluster.run(&["run", &local]).status.success());
    let (pipeline, work) = setup(&root.path().join("slurm"));
    let out = cluster.run(&["run", &pipeline, "--executor", "slurm"]);
    assert!(out.status.success());
    let said = text(&out);
    for stage in ["prep", "ranked"] {
        assert!(said.contains(&format!("{stage}: Slurm job ")) && said.contains("COMPLETED"), "job id and state shown: {said}");
    }
    assert_eq!(results(&work), results(&local_work), "same keys and outputs under both executors");
    let ranked: serde_json::Value = serde_json::from_slice(&results(&work)[1].2).unwrap();
    assert_eq!(ranked["world"], 2);
    assert_eq!(ranked["marks"], serde_json::json!(["mark0", "mark1"]), "both Slurm tasks ran, as ranks 0 and 1");
    assert_eq!(ranked["port"], true, "MASTER_PORT given for the rendezvous");
    let log = std::fs::read_to_string(manifest(&work, "p").stage("ranked").unwrap().outputs["o"].path.with_file_name("stage.log")).unwrap();
    assert!(log.contains("rank 0 of 2 starts") && log.contains("--- srun (Slurm job "), "{log}");
    // Cached now, whichever executor asks.
    assert!(stages_with(&work, "p", Status::Ran).len() == 2);
    assert!(cluster.run(&["run", &pipeline]).status.success());
    assert_eq!(stages_with(&work, "p", Status::Cached), set(&["prep", "ranked"]));

    // A failing rank: the job's state, exit code, the rank and its log tail are shown; no entry.
    let out = cluster.run(&["run", &pipeline, "--executor", "slurm", "--set", "fail_rank=1", "--set", "sleep=5"]);
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains("stage `ranked` failed (Slurm job "), "{said}");
    assert!(said.contains("FAILED, ExitCode "), "{said}");
    assert!(said.contains("rank 1 of 2: Exited with exit code 3"), "{said}");
    assert!(said.contains("| rank 1 gives up"), "{said}");
    assert!(would_run(&cluster, &pipeline, &["fail_rank=1", "sleep=5"]), "no cache entry for a failed job");
    assert!(cluster.jobs("halo-p-ranked").is_empty());

    // scancel of the running stage: the run fails that stage, no entry, no job left.
    let child = cluster.halo(&["run", &pipeline, "--executor", "slurm", "--set", "sleep=30"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut job = Vec::new();
    wait_until(Duration::from_secs(30), "the ranked job starting", || {
        job = cluster.jobs("halo-p-ranked");
        !job.is_empty()
    });
    cluster.client("scancel", &[&job[0]]);
    let out = child.wait_with_output().unwrap();
    eprintln!("{}", text(&out));
    assert!(!out.status.success());
    let said = text(&out);
    assert!(said.contains(&format!("stage `ranked` failed (Slurm job {}: CANCELLED", job[0])), "{said}");
    assert!(would_run(&cluster, &pipeline, &["sleep=30"]), "no cache entry for a cancelled job");
    assert!(cluster.jobs("halo-p-ranked").is_empty());

    // The runner killed (SIGKILL) or interrupted (SIGINT, SIGTERM): srun cancels the job, its
    // processes end, no entry.
    for (i, signal) in ["KILL", "INT", "TERM"].into_iter().enumerate() {
        let pids = root.path().join(format!("pids-{signal}"));
        std::fs::create_dir_all(&pids).unwrap();
        let (pids_set, sleep_set) = (format!("pids={}", pids.display()), format!("sleep={}", 31 + i));
        let mut cmd = cluster.halo(&["run", &pipeline, "--executor", "slurm", "--set", &sleep_set, "--set", &pids_set]);
        // As from a terminal: a test started in the background of a non-interactive shell
        // inherits SIGINT ignored, which the runner (as any program under nohup) keeps.
        // SAFETY: signal() is async-signal-safe, as pre_exec requires.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.stderr(Stdio::null()).spawn().unwrap();
        let rank_pids: Vec<String> = {
            let files = [pids.join("rank0.pid"), pids.join("rank1.pid")];
            wait_until(Duration::from_secs(30), "both ranks starting", || files.iter().all(|f| f.exists()));
            std::thread::sleep(Duration::from_millis(100));
            files.iter().map(|f| std::fs::read_to_string(f).unwrap()).collect()
        };
        assert_eq!(cluster.jobs("halo-p-ranked").len(), 1);
        assert!(Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap().success());
        let status = child.wait().unwrap();
        assert!(!status.success(), "SIG{signal}: {status:?}");
        let gone = wait_until(Duration::from_secs(10), &format!("the job leaving squeue after the runner's SIG{signal}"), || cluster.jobs("halo-p-ranked").is_empty());
        eprintln!("job gone {gone:?} after the runner's SIG{signal}");
        wait_until(Duration::from_secs(5), "the ranks' processes ending", || rank_pids.iter().all(|p| !alive(p)));
        assert!(would_run(&cluster, &pipeline, &[&sleep_set, &pids_set]), "no cache entry after the runner's SIG{signal}");
    }
}
