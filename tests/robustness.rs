//! Killed stages, failing and misbehaving custom stages, and bad pipelines: each gives a clear
//! error and leaves earlier results intact.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use haloflow::manifest::Status;

/// Writes a pipeline and its helper scripts into `dir`; returns the pipeline path.
fn write(dir: &Path, pipeline: &str, scripts: &[(&str, &str)]) -> String {
    for (name, body) in scripts {
        std::fs::write(dir.join(name), body).unwrap();
    }
    let path = dir.join("p.toml");
    std::fs::write(&path, pipeline).unwrap();
    path.to_string_lossy().into_owned()
}

const MAKE: &str = "import json, sys\njson.dump({'n': 1}, open(sys.argv[1], 'w'))\n";

/// Writes half a JSON document, records its pid, then sleeps before finishing.
const SLOW: &str = r#"import json, os, sys, time
out = open(sys.argv[2], "w")
out.write('{"half": ')
out.flush()
open(os.path.join(os.environ["HALO_OUT_DIR"], "pid"), "w").write(str(os.getpid()))
time.sleep(float(sys.argv[3]))
out.write("1}")
"#;

const KILL_PIPELINE: &str = r#"
[vars]
sleep = 0
[stages.first]
run = ["python3", "make.py", "{out.o}"]
outputs = { o = "json" }
[stages.slow]
run = ["python3", "slow.py", "{in.i}", "{out.o}", "{vars.sleep}"]
inputs = { i = "first.o" }
outputs = { o = "json" }
"#;

/// Waits until the running stage has written its pid file; returns the pid.
fn wait_for_stage(work: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(dirs) = std::fs::read_dir(work.join("tmp")) {
            for d in dirs.flatten() {
                if let Ok(pid) = std::fs::read_to_string(d.path().join("pid")) {
                    if let Ok(pid) = pid.trim().parse() {
                        return pid;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the slow stage never started");
}

fn sigkill(pid: i32) {
    assert!(std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap().success());
}

#[test]
fn sigkill_of_the_stage_leaves_no_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), KILL_PIPELINE, &[("make.py", MAKE), ("slow.py", SLOW)]);
    let work = tmp.path().join("work");
    let child = halo(&["run", &p, "--work-dir", work.to_str().unwrap(), "--set", "sleep=60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    sigkill(wait_for_stage(&work));
    let out = child.wait_with_output().unwrap();
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("stage `slow` failed (killed by signal 9 (SIGKILL))"), "{msg}");
    assert_eq!(cached_stages(&work), set(&["first"]));
    assert!(!work.join("tmp").read_dir().map(|mut d| d.next().is_some()).unwrap_or(false), "temp dir removed");
}

#[test]
fn sigkill_of_the_runner_leaves_no_entry_and_the_next_run_recovers() {
    let tmp = tempfile::tempdir().unwrap();
    let p = write(tmp.path(), KILL_PIPELINE, &[("make.py", MAKE), ("slow.py", SLOW)]);
    let work = tmp.path().join("work");
    let mut child = halo(&["run", &p, "--work-dir", work.to_str().unwrap(), "--set", "sleep=60"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stage_pid = wait_for_stage(&work);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The stage process dies with its runner (no orphan keeps writing).
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{stage_pid}")).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!Path::new(&format!("/proc/{stage_pid}/cmdline")).exists()
        || std::fs::read_to_string(format!("/proc/{stage_pid}/cmdline")).unwrap_or_default().is_empty(),
        "stage process outlived the runner");
    assert_eq!(cached_stages(&work), set(&["first"]), "no entry for the killed stage");
    // Half-written output stays in tmp/, which is not the cache; the next run cleans it.
    run_ok(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    assert_eq!(stages_with(&work, "p", Status::Cached), set(&["first"]));
    assert_eq!(stages_with(&work, "p", Status::Ran), set(&["slow"]));
    let m = manifest(&work, "p");
    let out = &m.stage("slow").unwrap().outputs["o"];
    assert_eq!(std::fs::read_to_string(&out.path).unwrap(), "{\"half\": 1}");
}

#[test]
fn relative_pipeline_and_work_dir_paths_work_from_any_directory() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    write(&tmp.path().join("sub"), KILL_PIPELINE, &[("make.py", MAKE), ("slow.py", SLOW)]);
    for extra in [&[][..], &["--work-dir", "elsewhere"][..]] {
        let out = halo(&[&["run", "sub/p.toml"][..], extra].concat()).current_dir(tmp.path()).output().unwrap();
        assert!(out.status.success(), "{}", text(&out));
    }
    assert!(tmp.path().join("sub/.halo/p.lock.json").is_file());
    assert!(tmp.path().join("elsewhere/p.lock.json").is_file());
}

#[test]
fn a_failing_custom_stage_shows_its_stderr_and_keeps_earlier_results() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = r#"
[vars]
code = 3
[stages.first]
run = ["python3", "make.py", "{out.o}"]
outputs = { o = "json" }
[stages.bad]
run = ["python3", "fail.py", "{in.i}", "{out.o}", "{vars.code}"]
inputs = { i = "first.o" }
outputs = { o = "json" }
[stages.after]
run = ["python3", "make.py", "{out.o}", "{in.i}"]
inputs = { i = "bad.o" }
outputs = { o = "json" }
"#;
    let fail = "import shutil, sys\ncode = int(sys.argv[3])\nif code:\n    print('something went wrong in row 7', file=sys.stderr)\n    sys.exit(code)\nshutil.copy(sys.argv[1], sys.argv[2])\n";
    let p = write(tmp.path(), pipeline, &[("make.py", MAKE), ("fail.py", fail)]);
    let work = tmp.path().join("work");
    let out = run(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    let msg = text(&out);
    assert!(!out.status.success());
    assert!(msg.contains("stage `bad` failed (exit status 3)") && msg.contains("something went wrong in row 7"), "{msg}");
    assert_eq!(stages_with(&work, "p", Status::Skipped), set(&["after"]));
    assert!(work.join("logs/bad.failed.log").is_file());
    // After the fix only the failed stage and its descendants run.
    run_ok(&["run", &p, "--work-dir", work.to_str().unwrap(), "--set", "code=0"]);
    assert_eq!(stages_with(&work, "p", Status::Cached), set(&["first"]));
    assert_eq!(stages_with(&work, "p", Status::Ran), set(&["bad", "after"]));
}

#[test]
fn outputs_that_break_the_schema_are_refused_with_column_and_types() {
    let tmp = tempfile::tempdir().unwrap();
    let writer = r#"import math, sys
import pyarrow as pa
mode = sys.argv[2]
msg = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
cols = {
    "example_id": pa.array(["a", "b"]), "prompt_id": pa.array(["p", "p"]),
    "prompt": pa.array([[{"role": "user", "content": "hi"}]] * 2, type=msg),
    "completion": pa.array(["x", "y"]), "label": pa.array([True, False]),
    "weight": pa.array([1.0, 1.0]),
}
if mode == "string_label":
    cols["label"] = pa.array(["yes", "no"])
if mode == "nan_weight":
    cols["weight"] = pa.array([1.0, math.nan])
table = pa.table(cols)
with pa.OSFile(sys.argv[1], "wb") as sink:
    with pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
"#;
    let pipeline = r#"
[vars]
mode = "ok"
[stages.mine]
run = ["python3", "writer.py", "{out.rows}", "{vars.mode}"]
outputs = { rows = "binary" }
"#;
    let p = write(tmp.path(), pipeline, &[("writer.py", writer)]);
    let work = tmp.path().join("work");
    let w = work.to_str().unwrap();
    for (mode, expected) in [
        ("string_label", "column `label`: expected type bool, found string"),
        ("nan_weight", "row 1: field `weight` is NaN"),
    ] {
        let out = run(&["run", &p, "--work-dir", w, "--set", &format!("mode={mode}")]);
        assert!(!out.status.success());
        let msg = text(&out);
        assert!(msg.contains("stage `mine` output `rows` does not match schema `binary`") && msg.contains(expected), "{msg}");
        assert!(cached_stages(&work).is_empty());
    }
    run_ok(&["run", &p, "--work-dir", w]);
    assert_eq!(manifest(&work, "p").stage("mine").unwrap().outputs["rows"].rows, Some(2));
}

#[test]
fn bad_pipelines_are_refused_clearly() {
    binary("halo-unpair");
    let tmp = tempfile::tempdir().unwrap();
    let cases = [
        ("[stages.a]\nuses = \"nope\"\n", "unknown built-in stage `nope` (known: import, unpair, resample"),
        (
            "[stages.a]\nrun = [\"x\", \"{in.i}\", \"{out.o}\"]\ninputs = { i = \"b.o\" }\noutputs = { o = \"json\" }\n[stages.b]\nrun = [\"x\", \"{in.i}\", \"{out.o}\"]\ninputs = { i = \"a.o\" }\noutputs = { o = \"json\" }\n",
            "the stages form a cycle",
        ),
        (
            "[stages.a]\nrun = [\"x\", \"{out.o}\"]\noutputs = { o = \"json\" }\n[stages.b]\nuses = \"unpair\"\ninputs = { pairs = \"a.pairs\" }\n",
            "stage `a` has no output `pairs` (its outputs: o)",
        ),
        ("[stages.a]\nuses = \"unpair\"\ninputs = { pairs = \"x\" }\n[stages.a]\nuses = \"unpair\"\n", "duplicate key"),
        ("[stages.a]\nrun = [\"x\", \"{out.o}\"]\noutputs = { o = \"pairz\" }\n", "unknown schema `pairz`"),
        ("[stages.a]\nuses = \"unpair\"\ninputs = { pairs = \"missing.arrow\" }\n", "missing.arrow: not found"),
        ("[stages.a]\nrun = [\"x\", \"{out.o}\"]\noutputs = { \"../../escaped\" = \"json\" }\n", "output name \"../../escaped\""),
        ("[pipeline]\nname = \"../up\"\n[stages.a]\nrun = [\"x\", \"{out.o}\"]\noutputs = { o = \"json\" }\n", "pipeline name \"../up\""),
        (
            "[stages.a]\nuses = \"unpair\"\ninputs = { pairs = \"missing.arrow\" }\nparams = { drop_conflict = true }\n",
            "stage `a`: param `drop_conflict` is not a flag of halo-unpair; did you mean `drop_conflicts`?",
        ),
    ];
    for (i, (pipeline, expected)) in cases.iter().enumerate() {
        let path = tmp.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, pipeline).unwrap();
        let out = run(&["run", path.to_str().unwrap(), "--work-dir", tmp.path().join("w").to_str().unwrap()]);
        assert!(!out.status.success(), "case {i} must fail");
        assert!(text(&out).contains(expected), "case {i}: expected `{expected}` in {}", text(&out));
    }
    // --dry-run checks a built-in stage's params against its flags too.
    let out = run(&["run", tmp.path().join(format!("bad{}.toml", cases.len() - 1)).to_str().unwrap(), "--dry-run", "--work-dir", tmp.path().join("w").to_str().unwrap()]);
    assert!(!out.status.success() && text(&out).contains("param `drop_conflict` is not a flag"), "{}", text(&out));
}

#[test]
fn bad_input_data_names_file_and_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("bad.jsonl"), "{\"prompt\": \"a\", \"chosen\": \"b\", \"rejected\": \"c\"}\n{\"prompt\": \"a\", \"chosen\": \n").unwrap();
    std::fs::write(tmp.path().join("empty.jsonl"), "").unwrap();
    for (file, expected) in [("bad.jsonl", "bad.jsonl:2"), ("empty.jsonl", "no rows")] {
        let pipeline = format!("[stages.imp]\nuses = \"import\"\ninputs = {{ source = \"{file}\" }}\nparams = {{ format = \"trl\" }}\n");
        let p = write(tmp.path(), &pipeline, &[]);
        let work = tmp.path().join("work");
        let out = run(&["run", &p, "--work-dir", work.to_str().unwrap()]);
        assert!(!out.status.success());
        assert!(text(&out).contains(expected), "expected `{expected}` in {}", text(&out));
        assert!(cached_stages(&work).is_empty());
    }
}

#[test]
fn datasets_readme_documents_the_current_schemas() {
    let readme = std::fs::read_to_string(repo_root().join("datasets/README.md")).unwrap();
    let out = run_ok(&["schema"]);
    let generated = String::from_utf8(out.stdout).unwrap();
    assert!(readme.contains(generated.trim()), "datasets/README.md is out of date: paste the output of `halo schema`");
}

#[test]
fn every_shipped_pipeline_parses() {
    let dir = repo_root().join("pipelines");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            run_ok(&["dag", path.to_str().unwrap()]);
            seen += 1;
        }
    }
    assert!(seen >= 5, "pipelines found: {seen}");
}

/// Concatenates two `binary` tables (a user's data stage that merges two imports).
const CONCAT: &str = r#"import sys, pyarrow as pa, pyarrow.ipc as ipc
tables = [ipc.open_file(p).read_all() for p in sys.argv[1:3]]
table = pa.concat_tables(tables)
with ipc.new_file(sys.argv[3], table.schema) as w:
    w.write_table(table)
"#;

#[test]
fn duplicate_example_ids_are_refused_naming_id_rows_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let rows = "{\"prompt\": \"q1\", \"completion\": \"a\", \"label\": true}\n{\"prompt\": \"q2\", \"completion\": \"b\", \"label\": false}\n";
    std::fs::write(tmp.path().join("one.jsonl"), rows).unwrap();
    std::fs::write(tmp.path().join("two.jsonl"), rows.replace("q1", "q3")).unwrap();
    let pipeline = |second: &str| {
        format!(
            r#"
[stages.a]
uses = "import"
inputs = {{ source = "one.jsonl" }}
params = {{ format = "trl", kind = "binary" }}
[stages.b]
uses = "import"
inputs = {{ source = "{second}" }}
params = {{ format = "trl", kind = "binary" }}
[stages.both]
run = ["python3", "concat.py", "{{in.a}}", "{{in.b}}", "{{out.rows}}"]
inputs = {{ a = "a.data", b = "b.data" }}
outputs = {{ rows = "binary" }}
[stages.resample]
uses = "resample"
inputs = {{ data = "both.rows" }}
params = {{ microbatch_size = 2 }}
"#
        )
    };
    let work = tmp.path().join("work");
    let w = work.to_str().unwrap();
    // Two different files: ids are unique per source file, so their union is fine.
    let p = write(tmp.path(), &pipeline("two.jsonl"), &[("concat.py", CONCAT)]);
    run_ok(&["run", &p, "--work-dir", w]);
    // The same file twice: the same ids twice, refused by the first stage that keys rows by id.
    let p = write(tmp.path(), &pipeline("one.jsonl"), &[("concat.py", CONCAT)]);
    let out = run(&["run", &p, "--work-dir", w]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("rows 0 and 2") && msg.contains("field `example_id`: duplicate id \"trl-") && msg.contains("rows.arrow"), "{msg}");
}

/// Unmounts a test file system when dropped.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_stage_on_a_full_disk_fails_with_status_1_and_says_so() {
    let Some(data) = shared_data() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let work = tmp.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let mounted = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=256k", "tmpfs"]).arg(&work).status();
    if !mounted.is_ok_and(|s| s.success()) {
        eprintln!("SKIPPED: a full disk is simulated with a 256 KiB tmpfs, which needs root (mount)");
        return;
    }
    let _guard = Mounted(work.clone());
    let source = data.join("hh-rlhf/helpful-base-test.jsonl.gz");
    let pipeline = format!("[stages.imp]\nuses = \"import\"\ninputs = {{ source = \"{}\" }}\nparams = {{ format = \"hh-rlhf\" }}\n", source.display());
    let p = write(tmp.path(), &pipeline, &[]);
    let out = run(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    assert!(!out.status.success());
    let msg = text(&out);
    assert!(msg.contains("exit status 1") && msg.contains("is the disk full?"), "{msg}");
}

/// Two stages with the same key in one run (as sweep points whose inputs came out identical):
/// they never execute at once into the same temporary directory; one runs, the other finds
/// its result in the cache.
#[test]
fn stages_sharing_a_key_run_once_and_share_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = r#"
[stages.first]
run = ["python3", "make.py", "{out.o}"]
outputs = { o = "json" }
[stages.a]
run = ["python3", "slow.py", "{in.i}", "{out.o}", "1"]
inputs = { i = "first.o" }
outputs = { o = "json" }
[stages.b]
run = ["python3", "slow.py", "{in.i}", "{out.o}", "1"]
inputs = { i = "first.o" }
outputs = { o = "json" }
"#;
    let p = write(tmp.path(), pipeline, &[("make.py", MAKE), ("slow.py", SLOW)]);
    let work = tmp.path().join("work");
    run_ok(&["run", &p, "--work-dir", work.to_str().unwrap()]);
    let m = manifest(&work, "p");
    let (a, b) = (m.stage("a").unwrap(), m.stage("b").unwrap());
    assert_eq!(a.key, b.key, "identical stages share a key");
    let mut statuses = [a.status, b.status];
    statuses.sort_by_key(|s| format!("{s:?}"));
    assert_eq!(statuses, [Status::Cached, Status::Ran], "one ran, the other found its entry");
}
