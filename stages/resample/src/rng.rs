//! A small self-contained deterministic PRNG (splitmix64) and a Fisher–Yates shuffle.
//!
//! Written here rather than taken from a crate so that a plan depends only on its seed: the
//! same input and seed give a byte-identical plan whatever the versions of the dependencies.

/// The splitmix64 generator (Steele, Lea & Flood 2014), with named sub-streams.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

/// FNV-1a hash of a stream label, used to give every purpose its own sequence.
fn fnv1a64(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Rng {
    /// A generator starting from `seed` (splitmix64's raw state).
    pub fn new(seed: u64) -> Self {
        Rng { state: seed }
    }

    /// An independent generator for one purpose of a run, e.g. `Rng::stream(seed, "subset/desirable")`:
    /// using one stream per purpose keeps, say, the kept undesirable rows unchanged when only the
    /// desirable fraction changes.
    pub fn stream(seed: u64, label: &str) -> Self {
        Rng::new(seed ^ fnv1a64(label))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform integer in `0..n` without modulo bias (`n` must be positive).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0, "Rng::below(0)");
        // Reject the lowest 2^64 mod n values so that every residue is equally likely.
        let threshold = n.wrapping_neg() % n;
        loop {
            let x = self.next_u64();
            if x >= threshold {
                return x % n;
            }
        }
    }

    /// Shuffles `items` in place (Fisher–Yates): every permutation is equally likely.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_reference_values() {
        // Published splitmix64 outputs for state 0; pins the algorithm forever.
        let mut rng = Rng::new(0);
        assert_eq!(rng.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(rng.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let shuffled = |seed: u64| {
            let mut v: Vec<u32> = (0..50).collect();
            Rng::stream(seed, "test").shuffle(&mut v);
            v
        };
        let a = shuffled(7);
        assert_eq!(a, shuffled(7));
        assert_ne!(a, shuffled(8));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
    }

    #[test]
    fn streams_differ_and_below_stays_in_range() {
        assert_ne!(Rng::stream(1, "a").next_u64(), Rng::stream(1, "b").next_u64());
        let mut rng = Rng::new(3);
        let mut seen = [0usize; 3];
        for _ in 0..3000 {
            seen[rng.below(3) as usize] += 1;
        }
        assert!(seen.iter().all(|&c| (800..1200).contains(&c)), "{seen:?}");
    }
}
