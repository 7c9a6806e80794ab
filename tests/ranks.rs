//! `ranks = N`: the runner starts N processes of a stage with the torchrun environment, keeps
//! a log per rank, stops every rank when one fails or when the runner dies, and keys the cache
//! on the rank count.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use haloflow::manifest::Status;

/// Each rank writes its environment to `rankR.json` in the stage's directory and a line to its
/// log; rank 0 also writes the declared output. With `{vars.pids}` set, each rank records its
/// pid there; rank `fail_rank` (if any) waits for the others' pids, prints a line and exits 3,
/// the other ranks sleep `{vars.sleep}` seconds first.
const RANK_PY: &str = r#"import json, os, sys, time
out, pids, sleep, fail_rank = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE"]
env = {k: os.environ.get(k) for k in keys}
json.dump(env, open(os.path.join(os.environ["HALO_OUT_DIR"], f"rank{rank}.json"), "w"))
print(f"hello from rank {rank} of {world}", file=sys.stderr, flush=True)
if pids != "-":
    open(os.path.join(pids, f"rank{rank}.pid"), "w").write(str(os.getpid()))
if rank == fail_rank:
    deadline = time.time() + 60
    while time.time() < deadline and len(os.listdir(pids)) < world:
        time.sleep(0.05)
    print(f"rank {rank} gives up", file=sys.stderr, flush=True)
    sys.exit(3)
time.sleep(sleep)
if rank == 0:
    json.dump(env, open(out, "w"))
"#;

const PIPELINE: &str = r#"
[vars]
ranks = 2
pids = "-"
sleep = 0
fail_rank = -1
[stages.ranked]
run = ["python3", "rank.py", "{out.o}", "{vars.pids}", "{vars.sleep}", "{vars.fail_rank}"]
outputs = { o = "json" }
ranks = "{vars.ranks}"
"#;

/// Writes the pipeline and its script into `dir`; returns the pipeline path and the work dir.
fn setup(dir: &Path, pipeline: &str) -> (String, PathBuf) {
    std::fs::write(dir.join("rank.py"), RANK_PY).unwrap();
    let path = dir.join("p.toml");
    std::fs::write(&path, pipeline).unwrap();
    (path.to_string_lossy().into_owned(), dir.join("work"))
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
}

/// The directory of the cache entry of a stage in the latest manifest.
fn entry_dir(work: &Path, stage: &str) -> PathBuf {
    let m = manifest(work, "p");
    work.join("cache").join(m.stage(stage).unwrap().key.as_ref().unwrap())
}

/// Pids recorded by the ranks in `dir`, by rank.
fn wait_for_pids(dir: &Path, n: usize) -> Vec<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pids: Vec<i32> = (0..n)
            .filter_map(|r| std::fs::read_to_string(dir.join(format!("rank{r}.pid"))).ok()?.trim().parse().ok())
            .collect();
        if pids.len() == n {
            return pids;
        }
        assert!(Instant::now() < deadline, "the ranks never started");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether a process is alive (a zombie or a vanished pid counts as dead).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[test]
fn every_rank_gets_the_torchrun_environment_and_its_own_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, work) = setup(tmp.path(), PIPELINE);
    let w = work.to_str().unwrap();
    run_ok(&["run", &p, "--work-dir", w, "--set", "ranks=3"]);
    let dir = entry_dir(&work, "ranked");
    let envs: Vec<serde_json::Value> = (0..3).map(|r| json(&dir.join(format!("rank{r}.json")))).collect();
    let port = envs[0]["MASTER_PORT"].as_str().unwrap().to_string();
    assert!(port.parse::<u16>().unwrap() > 0, "{port}");
    for (r, env) in envs.iter().enumerate() {
        assert_eq!(env["RANK"], r.to_string());
        assert_eq!(env["LOCAL_RANK"], r.to_string());
        assert_eq!(env["WORLD_SIZE"], "3");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "3");
        assert_eq!(env["MASTER_ADDR"], "127.0.0.1");
        assert_eq!(env["MASTER_PORT"], port.as_str(), "all ranks meet at one port");
        assert_eq!(env["TORCHELASTIC_USE_AGENT_STORE"], serde_json::Value::Null);
    }
    assert_eq!(json(&dir.join("o.json")), envs[0], "rank 0 writes the output");
    assert!(std::fs::read_to_string(dir.join("stage.log")).unwrap().contains("hello from rank 0 of 3"));
    for r in 1..3 {
        let log = std::fs::read_to_string(dir.join(format!("stage.rank{r}.log"))).unwrap();
        assert!(log.contains(&format!("hello from rank {r} of 3")), "{log}");
    }

    // The rank count is part of a command stage's key; the same count is cached.
    run_ok(&["run", &p, "--work-dir", w, "--set", "ranks=3"]);
    assert_eq!(stages_with(&work, "p", Status::Cached), set(&["ranked"]));
    run_ok(&["run", &p, "--work-dir", w, "--set", "ranks=1"]);
    let m = manifest(&work, "p");
    let record = m.stage("ranked").unwrap();
    assert_eq!(record.status, Status::Ran);
    assert_eq!(record.reason.as_deref(), Some("ranks 3 → 1"));
    let single = json(&entry_dir(&work, "ranked").join("o.json"));
    assert_eq!((single["RANK"].as_str(), single["WORLD_SIZE"].as_str(), &single["MASTER_PORT"]), (Some("0"), Some("1"), &serde_json::Value::Null));
}

#[test]
fn a_failing_rank_stops_the_others_and_fails_the_stage_with_its_log() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, work) = setup(tmp.path(), PIPELINE);
    let pids = tmp.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let started = Instant::now();
    let out = run(&["run", &p, "--work-dir", work.to_str().unwrap(), "--set", &format!("pids={}", pids.display()), "--set", "sleep=120", "--set", "fail_rank=1"]);
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("stage `ranked` failed (rank 1 of 2: exit status 3; the other ranks were stopped)"), "{msg}");
    assert!(msg.contains("rank 1 gives up"), "the failing rank's log tail is shown: {msg}");
    let rank0 = wait_for_pids(&pids, 2)[0];
    assert!(!alive(rank0), "rank 0 (pid {rank0}) outlived the failed stage");
    assert!(started.elapsed() < Duration::from_secs(110), "the runner waited for rank 0's sleep instead of stopping it");
    assert!(cached_stages(&work).is_empty(), "no cache entry for a failed stage");
    assert!(std::fs::read_to_string(work.join("logs/ranked.rank1.failed.log")).unwrap().contains("rank 1 gives up"));
    assert!(std::fs::read_to_string(work.join("logs/ranked.failed.log")).unwrap().contains("hello from rank 0 of 2"));
}

#[test]
fn every_rank_dies_with_the_runner() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, work) = setup(tmp.path(), PIPELINE);
    let pids = tmp.path().join("pids");
    std::fs::create_dir(&pids).unwrap();
    let mut child = halo(&["run", &p, "--work-dir", work.to_str().unwrap(), "--set", &format!("pids={}", pids.display()), "--set", "sleep=120"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ranks = wait_for_pids(&pids, 2);
    child.kill().unwrap(); // SIGKILL: no cleanup in the runner
    child.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while ranks.iter().any(|&pid| alive(pid)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    for pid in ranks {
        assert!(!alive(pid), "rank pid {pid} outlived the runner");
    }
    assert!(cached_stages(&work).is_empty());
}

#[test]
fn stages_that_cannot_shard_refuse_ranks_at_load() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = r#"
[stages.import]
uses = "import"
inputs = { source = "missing.jsonl" }
ranks = 2
"#;
    let (p, work) = setup(tmp.path(), pipeline);
    let out = run(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("stage `import`: built-in stage `import` cannot run on several ranks (ranks = 2)"), "{msg}");
    assert!(!work.join("cache").exists(), "nothing ran");
}

#[test]
fn torchrun_can_launch_the_ranks() {
    let tmp = tempfile::tempdir().unwrap();
    let (p, work) = setup(tmp.path(), &PIPELINE.replace("ranks = \"{vars.ranks}\"", "ranks = \"{vars.ranks}\"\nlauncher = \"torchrun\""));
    run_ok(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    let dir = entry_dir(&work, "ranked");
    for r in 0..2 {
        let env = json(&dir.join(format!("rank{r}.json")));
        assert_eq!((env["RANK"].as_str(), env["WORLD_SIZE"].as_str()), (Some(r.to_string().as_str()), Some("2")));
        assert_eq!(env["TORCHELASTIC_USE_AGENT_STORE"], "True", "torchrun's agent holds the store");
    }
    let log = std::fs::read_to_string(dir.join("stage.log")).unwrap();
    assert!(log.contains("hello from rank 0 of 2") && log.contains("hello from rank 1 of 2"), "torchrun's log holds every rank: {log}");
}
