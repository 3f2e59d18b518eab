//! The seeded kill schedule.
//!
//! A kill is planned as "after this many output records of one transformer
//! life were acknowledged by the broker", not as a wall-clock moment: the
//! same seed then kills at the same point of the work on any machine, and
//! every kill comes after the transformer has written something (so it
//! can land inside an open transaction). Where it actually lands is read
//! back from the process's own report, not assumed.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KillPlan {
    pub seed: u64,
    /// For each planned kill in turn: the acknowledgements one transformer
    /// life gets before the SIGKILL.
    pub after_acked: Vec<u64>,
}

impl KillPlan {
    /// `kills` kills, each after 1 to `max_acked` acknowledgements.
    pub fn from_seed(seed: u64, kills: usize, max_acked: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let after_acked = (0..kills)
            .map(|_| rng.gen_range(1..=max_acked.max(1)))
            .collect();
        Self { seed, after_acked }
    }
}

#[cfg(test)]
mod tests {
    use super::KillPlan;

    #[test]
    fn the_same_seed_plans_the_same_kills() {
        let plan = KillPlan::from_seed(7, 5, 40);
        assert_eq!(plan, KillPlan::from_seed(7, 5, 40));
        assert_eq!(plan.after_acked.len(), 5);
        assert!(plan.after_acked.iter().all(|&n| (1..=40).contains(&n)));
        assert_ne!(plan, KillPlan::from_seed(8, 5, 40));
    }
}
