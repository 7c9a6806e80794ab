//! Two ranks on 127.0.0.1 over Gloo: this test program spawns itself twice as the ranks
//! (environment HALO_DIST_TEST_ROLE), with torchrun's variables and a free port. Checks every
//! collective's result, then that the death of one rank (SIGKILL) makes the other fail
//! within the timeout with an error naming the collective and the lost rank, and that the
//! ranks join under torchrun (its agent's store). Also NCCL on one rank (on CUDA, or its clear
//! refusal without a GPU).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::sync::Arc;

use haloflow_dist::{BucketCounts, Dist, GradBuckets, ReduceOp, Rendezvous};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(30);

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap()
}

/// A rank's work for role `role`.
fn rank_main(role: &str) {
    if role == "join" {
        let err = Dist::from_env("gloo", Duration::from_secs(3)).err().expect("the rendezvous fails");
        println!("error: {err:#}");
        std::process::exit(3);
    }
    let dist = Arc::new(Dist::from_env("gloo", TIMEOUT).unwrap().expect("WORLD_SIZE is 2"));
    let (r, w) = (dist.rank() as f64, dist.world_size());
    assert_eq!(w, 2);
    match role {
        "collectives" => {
            // rank 0 holds [1, 2, 3], rank 1 holds [2, 4, 6]
            let mine = || Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (r + 1.0);
            let mut t = mine();
            dist.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            assert_eq!(values(&t), [3.0, 6.0, 9.0]);
            let mut t = mine();
            dist.all_reduce(&mut t, ReduceOp::Avg).unwrap();
            assert_eq!(values(&t), [1.5, 3.0, 4.5]);
            let mut t = mine();
            dist.all_reduce(&mut t, ReduceOp::Max).unwrap();
            assert_eq!(values(&t), [2.0, 4.0, 6.0]);
            let mut t = mine();
            dist.all_reduce(&mut t, ReduceOp::Min).unwrap();
            assert_eq!(values(&t), [1.0, 2.0, 3.0]);
            let mut ts = [mine(), Tensor::from_slice(&[10.0 * (r as f32 + 1.0)]), Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu))];
            dist.all_reduce_coalesced(&mut ts, ReduceOp::Sum).unwrap();
            assert_eq!((values(&ts[0]), values(&ts[1]), values(&ts[2].flatten(0, -1))), (vec![3.0, 6.0, 9.0], vec![30.0], vec![2.0; 4]));
            let mut t = Tensor::from_slice(&[r + 7.0]);
            dist.broadcast(&mut t, 1).unwrap();
            assert_eq!(values(&t), [8.0]);
            let mut out = [Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)), Tensor::zeros([3], (Kind::Float, tch::Device::Cpu))];
            dist.all_gather(&mut out, &mine()).unwrap();
            assert_eq!((values(&out[0]), values(&out[1])), (vec![1.0, 2.0, 3.0], vec![2.0, 4.0, 6.0]));
            // inputs[k] goes to rank k: rank k gets Σ_r inputs_r[k]
            let inputs = [Tensor::from_slice(&[r, 1.0]), Tensor::from_slice(&[10.0 * r, 100.0])];
            let mut out = Tensor::zeros([2], (Kind::Double, tch::Device::Cpu));
            dist.reduce_scatter(&mut out, &inputs, ReduceOp::Sum).unwrap();
            let expected = if r == 0.0 { [1.0, 2.0] } else { [10.0, 200.0] };
            assert_eq!(values(&out), expected);
            let gathered = dist.all_gather_bytes(format!("rank {r} says hi").repeat(dist.rank() + 1).as_bytes()).unwrap();
            assert_eq!(gathered, [b"rank 0 says hi".to_vec(), b"rank 1 says hirank 1 says hi".to_vec()]);
            dist.barrier().unwrap();
            let agent = std::env::var("TORCHELASTIC_USE_AGENT_STORE").unwrap_or_default();
            println!("collectives ok on rank {} (agent store: {agent:?})", dist.rank());
        }
        "async" => {
            let mine = || Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (r + 1.0);
            let ts = [mine(), Tensor::from_slice(&[10.0 * (r as f32 + 1.0)])];
            let work = dist.all_reduce_coalesced_async(&ts, ReduceOp::Sum).unwrap();
            work.wait().unwrap();
            assert_eq!((values(&ts[0]), values(&ts[1])), (vec![3.0, 6.0, 9.0], vec![30.0]));
            let ts = [mine()];
            dist.all_reduce_coalesced_async(&ts, ReduceOp::Avg).unwrap().wait().unwrap();
            assert_eq!(values(&ts[0]), [1.5, 3.0, 4.5]);
            // Two all-gathers in flight at once, waited for in the order they started.
            let (a, b) = (mine(), Tensor::from_slice(&[r, -r]));
            let (out_a, out_b) = (Tensor::zeros([6], (Kind::Float, tch::Device::Cpu)), Tensor::full([4], 9.0, (Kind::Double, tch::Device::Cpu)));
            let (wa, wb) = (dist.all_gather_into_async(&out_a, &a).unwrap(), dist.all_gather_into_async(&out_b, &b).unwrap());
            wa.wait().unwrap();
            wb.wait().unwrap();
            assert_eq!((values(&out_a), values(&out_b)), (vec![1.0, 2.0, 3.0, 2.0, 4.0, 6.0], vec![0.0, 0.0, 1.0, -1.0]));
            // In place: this rank's part of the output is the input.
            let out = Tensor::zeros([6], (Kind::Float, tch::Device::Cpu));
            let part = out.narrow(0, 3 * dist.rank() as i64, 3);
            part.shallow_clone().copy_(&mine());
            dist.all_gather_into_async(&out, &part).unwrap().wait().unwrap();
            assert_eq!(values(&out), [1.0, 2.0, 3.0, 2.0, 4.0, 6.0]);
            let err = dist.all_gather_into_async(&out_a, &b).err().expect("an output of the wrong size or type is refused");
            assert!(format!("{err}").contains("needs a contiguous output of 2 × 2 elements"), "{err}");
            gradient_buckets(dist.clone());
        }
        "die" => {
            dist.barrier().unwrap();
            if dist.rank() == 1 {
                println!("ready");
                std::thread::sleep(Duration::from_secs(600));
            }
            let mut t = Tensor::from_slice(&[1.0f32]);
            let err = dist.all_reduce(&mut t, ReduceOp::Sum).expect_err("rank 1 never joins");
            println!("error: {err:#}");
            std::process::exit(3);
        }
        other => panic!("unknown role {other}"),
    }
}

/// Gradient buckets on 2 ranks, of at most 20 bytes: [c], [b, a], [d, e] in the order given,
/// rebuilt after the first step in the order in which rank 0's gradients became final: [e, d],
/// [a, b], [c]. The gradients are views into their buckets' memory, all-reduced in place. The
/// counts are (started while gradients were still to come, the others, redone).
fn gradient_buckets(dist: Arc<Dist>) {
    let r = dist.rank() as f64;
    let param = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let (a, b, c, d, e) = (param(3), param(2), param(4), param(1), param(2));
    let mut buckets = GradBuckets::new(dist.clone(), &[c.shallow_clone(), b.shallow_clone(), a.shallow_clone(), d.shallow_clone(), e.shallow_clone()], 20).unwrap();
    let counts = |during_backward, after_backward, redone| BucketCounts { during_backward, after_backward, redone };
    let grad = |t: &Tensor| values(&t.grad());
    let sum = |t: &Tensor, k: f64| t.sum(Kind::Float) * k;

    // The gradients come one backward pass each. Rank 0 accumulates c at first and again at
    // the end (as activation checkpointing does with a tied embedding), rank 1 never produces
    // e's gradient (zeros). The first step does not know these counts yet: every bucket starts
    // after the backward pass.
    buckets.arm();
    let passes: &[(&Tensor, f64)] = if r == 0.0 { &[(&c, 3.0), (&e, 5.0), (&d, 4.0), (&a, 1.0), (&b, 2.0), (&c, 7.0)] } else { &[(&c, 6.0), (&b, 4.0), (&a, 2.0), (&d, 8.0)] };
    for (t, k) in passes {
        sum(t, *k).backward();
    }
    assert_eq!(buckets.finish().unwrap(), counts(0, 3, 0));
    let expected = |b: f64| (vec![3.0; 3], vec![b; 2], vec![16.0; 4], vec![12.0], vec![5.0; 2]);
    assert_eq!((grad(&a), grad(&b), grad(&c), grad(&d), grad(&e)), expected(6.0));

    // Rebuilt: [e, d] first, which rank 1 never completes (no e), so all its buckets start
    // after the backward pass. Rank 0's [c] waits for c's second accumulation, the last.
    let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, tch::Device::Cpu));
    for step in 1..4 {
        for t in [&a, &b, &c, &d, &e] {
            let _ = t.grad().zero_();
        }
        if step == 3 {
            // A gradient given other memory between steps is put back into its view when armed.
            let _ = a.grad().set_source_tensor_(&zeros(3));
        }
        buckets.arm();
        if r == 0.0 {
            (sum(&a, 1.0) + sum(&b, 2.0) + sum(&c, 3.0) + sum(&d, 4.0) + sum(&e, 5.0)).backward();
            sum(&c, 7.0).backward();
        } else {
            (sum(&a, 2.0) + sum(&c, 6.0) + sum(&d, 8.0)).backward();
        }
        assert_eq!(buckets.finish().unwrap(), if r == 0.0 { counts(2, 1, 0) } else { counts(0, 3, 0) }, "step {step}");
        assert_eq!((grad(&a), grad(&b), grad(&c), grad(&d), grad(&e)), expected(2.0), "step {step}");
    }
    // The gradients are views into their buckets' memory: b's follows a's in [a, b].
    let address = |t: &Tensor| t.grad().data_ptr() as usize;
    assert_eq!(address(&b), address(&a) + 3 * 4);

    // A count that changes after the first steps: rank 0 accumulates a again once [a, b]'s
    // all-reduce started. The sums are kept aside before that accumulation, and
    // every rank all-reduces again what came after them (nothing, on rank 1).
    for t in [&a, &b, &c, &d, &e] {
        let _ = t.grad().zero_();
    }
    buckets.arm();
    if r == 0.0 {
        (sum(&a, 1.0) + sum(&b, 2.0) + sum(&c, 3.0) + sum(&d, 4.0) + sum(&e, 5.0)).backward();
        sum(&c, 7.0).backward();
        // Time for [a, b]'s all-reduce to end: without the catch, a's late part would then
        // stay on rank 0 alone (before the end it races with the all-reduce).
        std::thread::sleep(std::time::Duration::from_millis(300));
        sum(&a, 10.0).backward();
    } else {
        (sum(&a, 2.0) + sum(&c, 6.0) + sum(&d, 8.0)).backward();
    }
    assert_eq!(buckets.finish().unwrap(), if r == 0.0 { counts(3, 0, 1) } else { counts(0, 3, 1) });
    assert_eq!((grad(&a), grad(&b), grad(&c), grad(&d), grad(&e)), (vec![13.0; 3], vec![2.0; 2], vec![16.0; 4], vec![12.0], vec![5.0; 2]));
    assert_eq!(address(&b), address(&a) + 3 * 4, "the redo keeps the views");

    // A gradient given other memory during the armed step cannot be all-reduced in place: an
    // error naming it, on every rank (each stops at the same bucket).
    buckets.arm();
    let _ = a.grad().set_source_tensor_(&zeros(3));
    (sum(&a, 1.0) + sum(&b, 2.0) + sum(&c, 3.0) + sum(&d, 4.0)).backward();
    let err = buckets.finish().unwrap_err().to_string();
    assert!(err.contains("the gradient of parameter 2 (bucket 1) was replaced during the backward pass"), "{err}");

    // Not armed: the hooks do nothing, and dropping the buckets removes them.
    sum(&a, 1.0).backward();
    drop(buckets);
    sum(&a, 1.0).backward();
    slice_buckets(&dist);
    println!("async and buckets ok on rank {}", dist.rank());
}

/// ZeRO-1's reduce-scatter buckets on 2 ranks over p (5 elements) and q (3): [p 0..4] and
/// [p 4..5, q 0..3, two zeros]; rank r gets the sums of each bucket's r-th half, in its own
/// part of the gradients (the rest stay local) or in a destination; ZeRO-2's drop the
/// gradients and add the sums to the destination.
fn slice_buckets(dist: &Arc<Dist>) {
    let r = dist.rank();
    let k = r as f64 + 1.0;
    let pieces = [(0, 0, 4, 0), (0, 4, 1, 1), (1, 0, 3, 1)];
    for with_dest in [false, true] {
        let p = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let q = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let dest = Tensor::full([5], -1.0, (Kind::Float, tch::Device::Cpu));
        let mut buckets = GradBuckets::slices(dist.clone(), &[p.shallow_clone(), q.shallow_clone()], &pieces, &[4, 6], with_dest.then_some(&dest), false).unwrap();
        buckets.arm();
        // Local gradients: p = k·(1, 2, 3, 4, 5), q = k·(10, 20, 30); sums 3·(1..5) and (30, 60, 90).
        let c = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]) * k;
        let d = Tensor::from_slice(&[10.0f32, 20.0, 30.0]) * k;
        ((&p * &c).sum(Kind::Float) + (&q * &d).sum(Kind::Float)).backward();
        let counts = buckets.finish().unwrap();
        assert_eq!(counts.during_backward + counts.after_backward, 2, "{counts:?}");
        let (gp, gq) = (values(&p.grad()), values(&q.grad()));
        let local = |v: &[f64]| v.iter().map(|x| x * k).collect::<Vec<f64>>();
        match (with_dest, r) {
            (false, 0) => assert_eq!((gp, gq), (vec![3.0, 6.0, 3.0, 4.0, 15.0], vec![30.0, 60.0, 30.0])),
            (false, _) => assert_eq!((gp, gq), (vec![2.0, 4.0, 9.0, 12.0, 10.0], vec![20.0, 40.0, 90.0])),
            (true, _) => {
                assert_eq!((gp, gq), (local(&[1.0, 2.0, 3.0, 4.0, 5.0]), local(&[10.0, 20.0, 30.0])), "gradients left as they were");
                assert_eq!(values(&dest), if r == 0 { [3.0, 6.0, 15.0, 30.0, 60.0] } else { [9.0, 12.0, 90.0, 0.0, 0.0] });
            }
        }
        if with_dest {
            continue;
        }
        // Rank 0's late 100 in p (both windows): every rank reduce-scatters its local
        // gradients again.
        let _ = p.grad().zero_();
        let _ = q.grad().zero_();
        let counts = pass_with_late_part(&mut buckets, [&p, &q, &c, &d], r);
        assert_eq!(counts.redone, 2, "{counts:?}");
        let expected = if r == 0 { (vec![103.0, 106.0, 103.0, 104.0, 115.0], vec![30.0, 60.0, 30.0]) } else { (vec![2.0, 4.0, 109.0, 112.0, 10.0], vec![20.0, 40.0, 90.0]) };
        assert_eq!((values(&p.grad()), values(&q.grad())), expected, "a late part counted once, on every rank");
    }
    shard_grads_buckets(dist, &pieces, k);
}

/// ZeRO-2's buckets (the same as [`slice_buckets`]'s): each armed pass drops the gradients
/// and adds its sums to the destination; a late part (rank 0 adds 100 to p once both windows
/// started, so p's first piece was zeroed and its gradient dropped) is reduced alone and added.
fn shard_grads_buckets(dist: &Arc<Dist>, pieces: &[(usize, i64, i64, usize)], k: f64) {
    let r = dist.rank();
    let p = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let q = Tensor::zeros([3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
    let mut dest = Tensor::zeros([5], (Kind::Float, tch::Device::Cpu));
    let mut buckets = GradBuckets::slices(dist.clone(), &[p.shallow_clone(), q.shallow_clone()], pieces, &[4, 6], Some(&dest), true).unwrap();
    let c = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0]) * k;
    let d = Tensor::from_slice(&[10.0f32, 20.0, 30.0]) * k;
    buckets.arm();
    ((&p * &c).sum(Kind::Float) + (&q * &d).sum(Kind::Float)).backward();
    buckets.finish().unwrap();
    assert!(!p.grad().defined() && !q.grad().defined(), "the gradients were dropped");
    assert_eq!(values(&dest), if r == 0 { [3.0, 6.0, 15.0, 30.0, 60.0] } else { [9.0, 12.0, 90.0, 0.0, 0.0] });
    let counts = pass_with_late_part(&mut buckets, [&p, &q, &c, &d], r);
    assert_eq!(counts.redone, 2, "{counts:?}");
    assert!(!p.grad().defined() && !q.grad().defined(), "the late gradient was dropped too");
    let expected = if r == 0 { [106.0, 112.0, 130.0, 60.0, 120.0] } else { [118.0, 124.0, 180.0, 0.0, 0.0] };
    assert_eq!(values(&dest), expected, "two passes added, the late part once");
    // Freed between steps (as the optimizer frees it), the destination comes back with the
    // first window, zeroed before the sums are added.
    dest.set_data(&Tensor::empty([0], (Kind::Float, tch::Device::Cpu)));
    buckets.arm();
    ((&p * &c).sum(Kind::Float) + (&q * &d).sum(Kind::Float)).backward();
    buckets.finish().unwrap();
    assert_eq!(values(&dest), if r == 0 { [3.0, 6.0, 15.0, 30.0, 60.0] } else { [9.0, 12.0, 90.0, 0.0, 0.0] });
}

/// An armed pass of p·c + q·d after which rank 0 accumulates 100 more into p, once the
/// windows' reduce-scatters ended and were released (300 ms): a late part every rank reduces
/// again.
fn pass_with_late_part(buckets: &mut GradBuckets, [p, q, c, d]: [&Tensor; 4], rank: usize) -> BucketCounts {
    buckets.arm();
    ((p * c).sum(Kind::Float) + (q * d).sum(Kind::Float)).backward();
    if rank == 0 {
        std::thread::sleep(std::time::Duration::from_millis(300));
        (p * 100.0).sum(Kind::Float).backward();
    }
    buckets.finish().unwrap()
}

fn free_port() -> u16 {
    haloflow::runner::free_port().unwrap()
}

fn spawn(role: &str, port: u16) -> Vec<Child> {
    spawn_ranks(role, port, 0..2)
}

fn spawn_ranks(role: &str, port: u16, ranks: std::ops::Range<usize>) -> Vec<Child> {
    ranks
        .map(|rank| {
            Command::new(std::env::current_exe().unwrap())
                .env("HALO_DIST_TEST_ROLE", role)
                .env("WORLD_SIZE", "2")
                .env("RANK", rank.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn output(child: Child) -> (i32, String) {
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `all_reduce_coalesced_async`, `all_gather_into_async` (two in flight), and gradient buckets
/// started by their hooks during the backward pass, after it, redone, and rebuilt (see
/// `gradient_buckets`).
fn async_all_reduce_and_gradient_buckets() {
    every_rank_reports("async", "async and buckets ok");
}

fn every_collective_gives_the_expected_result() {
    every_rank_reports("collectives", "collectives ok");
}

/// Runs `mode` on the ranks; each must exit 0 and print `ok` with its rank.
fn every_rank_reports(mode: &str, ok: &str) {
    let ranks = spawn(mode, free_port());
    for (rank, child) in ranks.into_iter().enumerate() {
        let (code, stdout) = output(child);
        assert_eq!(code, 0, "rank {rank} failed: {stdout}");
        assert!(stdout.contains(&format!("{ok} on rank {rank}")), "{stdout}");
    }
}

fn a_killed_rank_makes_the_other_fail_naming_it() {
    let mut ranks = spawn("die", free_port());
    let mut victim = ranks.pop().unwrap();
    let mut line = String::new();
    BufReader::new(victim.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let killed = Instant::now();
    victim.kill().unwrap(); // SIGKILL
    victim.wait().unwrap();
    let (code, stdout) = output(ranks.pop().unwrap());
    let seconds = killed.elapsed().as_secs_f64();
    println!("rank 0 failed {seconds:.2} s after rank 1 was killed: {}", stdout.trim());
    assert_eq!(code, 3, "{stdout}");
    assert!(seconds < TIMEOUT.as_secs_f64(), "took {seconds} s");
    assert!(stdout.contains("`all_reduce` failed on rank 0 of 2"), "{stdout}");
    assert!(stdout.contains("lost rank(s) 1 "), "the lost rank is not named: {stdout}");
}

/// A port in use, or no store at the master: one clear error each, within the timeout.
fn a_port_in_use_or_an_unreachable_master_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let (code, stdout) = output(spawn_ranks("join", port, 0..1).pop().unwrap());
    assert_eq!(code, 3);
    assert!(stdout.contains(&format!("rank 0 of 2: cannot join the gloo process group through the store at 127.0.0.1:{port}")), "{stdout}");
    assert!(stdout.to_lowercase().contains("address already in use"), "{stdout}");
    drop(taken);
    let started = Instant::now();
    let (code, stdout) = output(spawn_ranks("join", free_port(), 1..2).pop().unwrap());
    let seconds = started.elapsed().as_secs_f64();
    println!("rank 1 gave up on an absent store after {seconds:.1} s: {}", stdout.trim());
    assert_eq!(code, 3);
    assert!(stdout.contains("rank 1 of 2: cannot join"), "{stdout}");
    assert!(seconds < 20.0, "{seconds} s for a 3 s timeout");
}

/// Under torchrun, whose agent serves the store (TORCHELASTIC_USE_AGENT_STORE=True): every
/// rank joins as a client under the attempt's key prefix.
fn under_torchrun_with_its_agent_store() {
    let out = Command::new("torchrun")
        .args(["--nproc-per-node", "2", "--no-python", "--master-port", &free_port().to_string()])
        .arg(std::env::current_exe().unwrap())
        .env("HALO_DIST_TEST_ROLE", "collectives")
        .output()
        .expect("torchrun on PATH (source ci/env.sh: the project venv's torch)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for rank in 0..2 {
        assert!(stdout.contains(&format!("collectives ok on rank {rank} (agent store: \"True\")")), "{stdout}");
    }
}

/// NCCL on one rank: with a CUDA device, every collective on CUDA tensors (what ci/gpu-check.sh
/// runs); on a machine without one, a build with NCCL refuses the group with an error, no
/// crash. A build without NCCL (no CUDA headers) skips it, saying so.
fn nccl_on_one_rank() {
    if !haloflow_dist::NCCL {
        assert!(!tch::Cuda::is_available(), "a CUDA machine must build NCCL in (run ci/bootstrap.sh for its headers)");
        println!("skipped: this build has no NCCL");
        return;
    }
    let rv = Rendezvous { rank: 0, world_size: 1, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: free_port(), serve_store: true, prefix: "nccl-test".into() };
    let joined = Dist::connect("nccl", rv, TIMEOUT);
    if !tch::Cuda::is_available() {
        let err = format!("{:#}", joined.err().expect("NCCL without a GPU must fail"));
        println!("without CUDA: {err}");
        assert!(err.contains("cannot join the nccl process group") && !err.contains("this build has no NCCL"), "{err}");
        return;
    }
    let dist = joined.unwrap();
    let cuda = tch::Device::Cuda(0);
    let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(cuda);
    dist.all_reduce(&mut t, ReduceOp::Sum).unwrap();
    assert_eq!(values(&t.to_device(tch::Device::Cpu)), [1.0, 2.0, 3.0]);
    let mut ts = [Tensor::ones([4], (Kind::BFloat16, cuda)), Tensor::full([2], 5.0, (Kind::BFloat16, cuda))];
    dist.all_reduce_coalesced(&mut ts, ReduceOp::Avg).unwrap();
    assert_eq!(values(&ts[1].to_device(tch::Device::Cpu)), [5.0, 5.0]);
    dist.broadcast(&mut t, 0).unwrap();
    let mut out = [Tensor::zeros([3], (Kind::Float, cuda))];
    dist.all_gather(&mut out, &t).unwrap();
    assert_eq!(values(&out[0].to_device(tch::Device::Cpu)), [1.0, 2.0, 3.0]);
    let mut one = Tensor::zeros([3], (Kind::Float, cuda));
    dist.reduce_scatter(&mut one, &[t.shallow_clone()], ReduceOp::Sum).unwrap();
    assert_eq!(values(&one.to_device(tch::Device::Cpu)), [1.0, 2.0, 3.0]);
    // ZeRO-1's all-gather: in place (the input is this rank's part of the output), started
    // and waited for later.
    let dist = Arc::new(dist);
    let out = Tensor::zeros([4], (Kind::BFloat16, cuda));
    let _ = out.narrow(0, 0, 4).fill_(7.0);
    let work = dist.all_gather_into_async(&out, &out.narrow(0, 0, 4)).unwrap();
    work.wait().unwrap();
    assert_eq!(values(&out.to_device(tch::Device::Cpu)), [7.0; 4]);
    dist.barrier().unwrap();
    println!("nccl ok on one rank ({})", dist.backend());
}

fn main() {
    if let Ok(role) = std::env::var("HALO_DIST_TEST_ROLE") {
        rank_main(&role);
        return;
    }
    for (name, test) in [
        ("every_collective_gives_the_expected_result", every_collective_gives_the_expected_result as fn()),
        ("async_all_reduce_and_gradient_buckets", async_all_reduce_and_gradient_buckets),
        ("a_killed_rank_makes_the_other_fail_naming_it", a_killed_rank_makes_the_other_fail_naming_it),
        ("under_torchrun_with_its_agent_store", under_torchrun_with_its_agent_store),
        ("a_port_in_use_or_an_unreachable_master_is_a_clear_error", a_port_in_use_or_an_unreachable_master_is_a_clear_error),
        ("nccl_on_one_rank", nccl_on_one_rank),
    ] {
        let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        if args.iter().all(|f| name.contains(f.as_str())) {
            test();
            println!("test {name} ... ok");
        }
    }
}
