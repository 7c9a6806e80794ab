//! Two ranks on 127.0.0.1 over Gloo: this test program spawns itself twice as the ranks
//! (environment HALO_DIST_TEST_ROLE), with torchrun's variables and a free port. Checks every
//! collective's result, then that the death of one rank (SIGKILL) makes the other fail
//! within the timeout with an error naming the collective and the lost rank.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use haloflow_dist::{Dist, ReduceOp};
use tch::{Kind, Tensor};

const TIMEOUT: Duration = Duration::from_secs(30);

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.to_kind(Kind::Double)).unwrap()
}

/// A rank's work for role `role`.
fn rank_main(role: &str) {
    let dist = Dist::from_env("gloo", TIMEOUT).unwrap().expect("WORLD_SIZE is 2");
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
            println!("collectives ok on rank {}", dist.rank());
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn spawn(role: &str, port: u16) -> Vec<Child> {
    (0..2)
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

fn every_collective_gives_the_expected_result() {
    let ranks = spawn("collectives", free_port());
    for (rank, child) in ranks.into_iter().enumerate() {
        let (code, stdout) = output(child);
        assert_eq!(code, 0, "rank {rank} failed: {stdout}");
        assert!(stdout.contains(&format!("collectives ok on rank {rank}")), "{stdout}");
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

fn main() {
    if let Ok(role) = std::env::var("HALO_DIST_TEST_ROLE") {
        rank_main(&role);
        return;
    }
    for (name, test) in [
        ("every_collective_gives_the_expected_result", every_collective_gives_the_expected_result as fn()),
        ("a_killed_rank_makes_the_other_fail_naming_it", a_killed_rank_makes_the_other_fail_naming_it),
    ] {
        let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
        if args.iter().all(|f| name.contains(f.as_str())) {
            test();
            println!("test {name} ... ok");
        }
    }
}
