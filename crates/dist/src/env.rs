//! Where a process sits in a distributed run, read from the environment of torchrun (or any
//! launcher setting its variables) or of Slurm's `srun`.

use anyhow::{bail, Context, Result};

/// The default TCPStore port (torch's).
pub const DEFAULT_PORT: u16 = 29500;

/// A process's place in the run and how to reach the rendezvous store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// This process's rank, `0..world_size`.
    pub rank: usize,
    /// The number of processes.
    pub world_size: usize,
    /// This process's rank on its node (its GPU).
    pub local_rank: usize,
    /// The TCPStore's host.
    pub master_addr: String,
    /// The TCPStore's port.
    pub master_port: u16,
    /// Whether this process serves the store (rank 0, unless torchrun's agent serves it).
    pub serve_store: bool,
    /// The store's key prefix (torchrun's agent store: `/worker/attempt_N/…`).
    pub prefix: String,
}

/// The key prefix of haloflow's process group inside the store.
const PREFIX: &str = "haloflow";

/// Reads the rendezvous through `var` (the process environment in [`Rendezvous::from_env`]).
/// `None` when no launcher variables are set or the world has one process.
pub fn read(var: impl Fn(&str) -> Option<String>) -> Result<Option<Rendezvous>> {
    let number = |name: &str| -> Result<Option<usize>> {
        var(name).map(|v| v.trim().parse::<usize>().with_context(|| format!("environment variable {name}={v:?} is not a non-negative integer"))).transpose()
    };
    let (world_size, rank, local_rank, addr, launcher) = if let Some(world) = number("WORLD_SIZE")? {
        let rank = number("RANK")?.context("WORLD_SIZE is set but RANK is not (launch with torchrun, srun or halo run)")?;
        (world, rank, number("LOCAL_RANK")?.unwrap_or(rank), var("MASTER_ADDR"), "torchrun")
    } else if let Some(world) = number("SLURM_NTASKS")? {
        let rank = number("SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
        let first = var("SLURM_JOB_NODELIST").or_else(|| var("SLURM_NODELIST")).map(|l| first_host(&l));
        (world, rank, number("SLURM_LOCALID")?.unwrap_or(0), var("MASTER_ADDR").or(first), "slurm")
    } else {
        return Ok(None);
    };
    if world_size <= 1 {
        return Ok(None);
    }
    if rank >= world_size {
        bail!("rank {rank} is not below the world size {world_size} ({launcher} environment)");
    }
    let master_addr = addr.with_context(|| format!("a {world_size}-process run needs MASTER_ADDR (the host of rank 0)"))?;
    let master_port = match var("MASTER_PORT") {
        Some(p) => p.trim().parse::<u16>().with_context(|| format!("environment variable MASTER_PORT={p:?} is not a port number"))?,
        None => DEFAULT_PORT,
    };
    let agent = var("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let prefix = if agent {
        let attempt = var("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
        format!("/worker/attempt_{attempt}/{PREFIX}")
    } else {
        PREFIX.to_string()
    };
    Ok(Some(Rendezvous { rank, world_size, local_rank, master_addr, master_port, serve_store: !agent && rank == 0, prefix }))
}

/// The first host of a Slurm node list: `gpu[07-09,12],cpu1` → `gpu07`.
pub fn first_host(list: &str) -> String {
    let list = list.trim();
    let mut depth = 0;
    let end = list
        .char_indices()
        .find(|&(_, c)| {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ => {}
            }
            c == ',' && depth == 0
        })
        .map_or(list.len(), |(i, _)| i);
    let first = &list[..end];
    match first.split_once('[') {
        Some((stem, ranges)) => {
            let start = ranges.split([',', '-', ']']).next().unwrap_or("");
            format!("{stem}{start}")
        }
        None => first.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn torchrun_environment() {
        let r = read(env(&[("WORLD_SIZE", "4"), ("RANK", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "n1"), ("MASTER_PORT", "1234")])).unwrap().unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank, r.master_addr.as_str(), r.master_port, r.serve_store), (2, 4, 0, "n1", 1234, false));
        assert_eq!(r.prefix, "haloflow");
        let r0 = read(env(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "n1")])).unwrap().unwrap();
        assert!(r0.serve_store);
        assert_eq!(r0.master_port, DEFAULT_PORT);
    }

    #[test]
    fn torchrun_agent_store_is_a_client_under_the_attempt_prefix() {
        let vars = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "n1"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "3")];
        let r = read(env(&vars)).unwrap().unwrap();
        assert!(!r.serve_store);
        assert_eq!(r.prefix, "/worker/attempt_3/haloflow");
    }

    #[test]
    fn slurm_environment() {
        let vars = [("SLURM_NTASKS", "8"), ("SLURM_PROCID", "5"), ("SLURM_LOCALID", "1"), ("SLURM_JOB_NODELIST", "gpu[07-09,12],cpu1"), ("MASTER_PORT", "29600")];
        let r = read(env(&vars)).unwrap().unwrap();
        assert_eq!((r.rank, r.world_size, r.local_rank, r.master_addr.as_str(), r.master_port, r.serve_store), (5, 8, 1, "gpu07", 29600, false));
        assert_eq!(first_host("node1,node2"), "node1");
        assert_eq!(first_host("a-[001-004]"), "a-001");
    }

    #[test]
    fn single_process_and_bad_values() {
        assert_eq!(read(env(&[])).unwrap(), None);
        assert_eq!(read(env(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(), None);
        let e = |vars: &[(&str, &str)]| read(env(vars)).unwrap_err().to_string();
        assert!(e(&[("WORLD_SIZE", "two")]).contains("WORLD_SIZE"));
        assert!(e(&[("WORLD_SIZE", "2")]).contains("RANK is not"));
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h")]).contains("not below"));
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "1")]).contains("MASTER_ADDR"));
        assert!(e(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")]).contains("MASTER_PORT"));
    }
}
