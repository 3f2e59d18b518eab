//! The audit: what was promised against what the PSP's ledger says moved.
//!
//! Expected = the orders committed in the shop database. Executed = rows in
//! the PSP's ledger. The consumer's own `payments` table is read too, and
//! reported beside the ledger, never instead of it.

use std::collections::{HashMap, HashSet};

use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Orders committed in the shop database.
    pub orders_committed: u64,
    /// Rows in the PSP's ledger for this run.
    pub charges_executed: u64,
    /// Σ over committed orders of max(0, executed charges − 1).
    pub double_charges: u64,
    /// Committed orders with no executed charge.
    pub lost_events: u64,
    /// Ledger rows for orders the shop never committed (should be zero).
    pub unexpected_charges: u64,
    /// Rows in the consumer's own payments table: its belief, not the truth.
    pub payments_recorded: u64,
    /// Extra charges per order, for the orders charged more than once.
    #[serde(skip)]
    pub extra_charges_by_order: HashMap<String, u64>,
    /// Committed orders by how many times the PSP charged them: 0, 1, 2,
    /// and 3 or more.
    pub charges_per_order: [u64; 4],
    /// Committed orders not charged exactly once, sorted.
    pub offending_orders: Vec<String>,
}

impl Audit {
    /// The design's verdict: every committed order charged exactly once,
    /// and no order charged that the shop never committed.
    pub fn every_order_charged_once(&self) -> bool {
        self.offending_orders.is_empty() && self.charges_per_order[1] == self.orders_committed
    }

    pub async fn measure(shop: &PgPool, psp: &PgPool) -> anyhow::Result<Self> {
        let expected: HashSet<String> = shop::committed_order_ids(shop)
            .await?
            .into_iter()
            .map(|id| id.to_string())
            .collect();
        let executed: HashMap<String, i64> = psp::ledger::charge_counts_by_order(psp).await?;
        let payments_recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM payments")
            .fetch_one(shop)
            .await?;
        Ok(Self::from_counts(
            &expected,
            &executed,
            payments_recorded as u64,
        ))
    }

    pub fn from_counts(
        expected: &HashSet<String>,
        executed: &HashMap<String, i64>,
        payments_recorded: u64,
    ) -> Self {
        let charged = |order: &String| executed.get(order).copied().unwrap_or(0).max(0) as u64;
        let mut charges_per_order = [0; 4];
        for order in expected {
            charges_per_order[charged(order).min(3) as usize] += 1;
        }
        let mut offending_orders: Vec<String> = expected
            .iter()
            .filter(|o| charged(o) != 1)
            .cloned()
            .collect();
        offending_orders.sort();
        Self {
            charges_per_order,
            offending_orders,
            orders_committed: expected.len() as u64,
            charges_executed: executed.values().map(|&n| n.max(0) as u64).sum(),
            double_charges: expected.iter().map(|o| charged(o).saturating_sub(1)).sum(),
            lost_events: expected.iter().filter(|o| charged(o) == 0).count() as u64,
            unexpected_charges: executed
                .iter()
                .filter(|(order, _)| !expected.contains(*order))
                .map(|(_, &n)| n.max(0) as u64)
                .sum(),
            payments_recorded,
            extra_charges_by_order: expected
                .iter()
                .filter(|o| charged(o) > 1)
                .map(|o| (o.clone(), charged(o) - 1))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_the_design_definitions() {
        let expected: HashSet<String> = ["a", "b", "c", "d"].map(String::from).into();
        let executed: HashMap<String, i64> = [("a", 1), ("b", 3), ("c", 0), ("x", 2)]
            .map(|(k, v)| (k.to_owned(), v))
            .into();
        let audit = Audit::from_counts(&expected, &executed, 5);
        assert_eq!(audit.orders_committed, 4);
        assert_eq!(audit.charges_executed, 6);
        assert_eq!(audit.double_charges, 2, "b was charged three times");
        assert_eq!(audit.lost_events, 2, "c and d were never charged");
        assert_eq!(audit.unexpected_charges, 2);
        assert_eq!(audit.payments_recorded, 5);
        assert_eq!(audit.charges_per_order, [2, 1, 0, 1]);
        assert_eq!(audit.offending_orders, ["b", "c", "d"]);
    }
}
