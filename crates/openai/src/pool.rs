//! Bounded concurrency: jobs run on a few threads, their results are handled one at a time on
//! the calling thread (where the cache is appended to) as soon as each arrives.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;

use anyhow::Result;

/// Runs `work(j)` for every job `j` in `0..jobs` on at most `workers` threads (at least one) and
/// hands each result to `done(j, result)` on the calling thread, in the order they finish. When
/// `done` fails, no further job starts; the jobs in flight finish (their results are dropped)
/// and the first error is returned.
pub fn run<R: Send>(
    jobs: usize,
    workers: usize,
    work: impl Fn(usize) -> R + Sync,
    mut done: impl FnMut(usize, R) -> Result<()>,
) -> Result<()> {
    let workers = workers.clamp(1, jobs.max(1));
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let mut error = None;
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        for _ in 0..workers {
            let tx = tx.clone();
            let (next, stop, work) = (&next, &stop, &work);
            scope.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let j = next.fetch_add(1, Ordering::Relaxed);
                    if j >= jobs || tx.send((j, work(j))).is_err() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        for (j, result) in rx {
            if error.is_some() {
                continue;
            }
            if let Err(e) = done(j, result) {
                stop.store(true, Ordering::Relaxed);
                error = Some(e);
            }
        }
    });
    error.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn every_job_runs_once_on_at_most_the_workers() {
        let (running, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let mut seen = vec![0; 40];
        run(
            40,
            3,
            |j| {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(2));
                running.fetch_sub(1, Ordering::SeqCst);
                j * 2
            },
            |j, r| {
                assert_eq!(r, j * 2);
                seen[j] += 1;
                Ok(())
            },
        )
        .unwrap();
        assert!(seen.iter().all(|&n| n == 1));
        assert!((1..=3).contains(&most.load(Ordering::SeqCst)));
        run(0, 4, |j| j, |_, _| panic!("no job")).unwrap();
    }

    #[test]
    fn a_failing_handler_stops_new_jobs_and_returns_its_error() {
        let started = AtomicUsize::new(0);
        let error = run(
            1000,
            2,
            |j| {
                started.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(std::time::Duration::from_millis(1));
                j
            },
            |j, _| if j >= 5 { anyhow::bail!("job {j} failed") } else { Ok(()) },
        )
        .unwrap_err();
        assert!(error.to_string().starts_with("job "), "{error}");
        assert!(started.load(Ordering::SeqCst) < 1000, "jobs stop once the handler fails");
    }
}
