//! Chapter 5: the visibility timeout.
//!
//! SQS does not watch consumers. It hides a received message for the
//! queue's visibility timeout, and if no delete arrives by then it hands the
//! message to the next consumer that asks, whether or not the first one is
//! still working on it. Measured here, all on SQS with competing consumer
//! processes and orders arriving over time:
//! - misconfigured: a 1 s timeout below a 1.2 s charge. The naive consumer
//!   charges again on every redelivery; the hardened one (dedup + key) keeps
//!   the money right but pays in redeliveries, dedup hits and late acks;
//! - sized: the timeout from the measured charge time p99 × 2; then a slow
//!   tail the sizing did not see, without and with a visibility heartbeat;
//! - poison: a malformed message, a 422, and a message that kills every
//!   consumer that touches it all end in the dead-letter queue with a reason,
//!   while every real order is charged exactly once.

use std::process::ExitCode;
use std::time::Duration;

use chaos_lab::plan::{Poison, ProducerFault};
use chaos_lab::run::RunSpec;
use chaos_lab::{BackendKind, ChaosPlan, Chapter, ChapterReport, Claim, FaultMix, Lab, RunReport};
use consumer::crash::CrashPoint;
use consumer::{Heartbeat, Variant};
use psp::FaultConfig;

static CHAPTER: Chapter = Chapter {
    id: "ch05",
    title: "the visibility timeout",
    default_messages: 20,
    backends: &[BackendKind::Sqs],
};

/// What one charge costs at the PSP: the work a lease must cover.
const CHARGE_LATENCY: Duration = Duration::from_millis(1200);
/// Below the work: the misconfiguration.
const TOO_SHORT: Duration = Duration::from_secs(1);
/// The sizing rule: the measured p99 times this margin, in whole seconds.
const MARGIN: f64 = 2.0;
/// Orders arrive one per this, so consumers sit idle between them and are
/// free to take a message whose timeout ran out, as in production.
const ORDER_PACE: Duration = Duration::from_millis(500);
/// The slow tail: this share of orders (at least one) has a first charge
/// that takes longer than the sized lease.
const SLOW_SHARE: f64 = 0.15;
/// How long the slow tail takes beyond the sized lease.
const SLOW_BEYOND_LEASE: Duration = Duration::from_secs(2);
/// The poison run's redrive policy: the third receive is the last.
const POISON_MAX_RECEIVES: u32 = 3;

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main(&CHAPTER, visibility_timeout).await
}

/// Every run of this chapter: a fault-free schedule (the timeout is the
/// fault), a PSP that takes `CHARGE_LATENCY`, orders paced over time.
fn spec(lab: &Lab, variant: Variant, plan: &ChaosPlan, scenario: String) -> RunSpec {
    let mut spec = lab.spec(variant, plan);
    spec.scenario = scenario;
    spec.publish_pace = Some(ORDER_PACE);
    spec.psp_faults = FaultConfig {
        latency: CHARGE_LATENCY,
        seed: lab.seed,
        ..FaultConfig::default()
    };
    // Longer than the slowest charge: this chapter is about the broker's
    // timer, not the PSP client's.
    spec.psp_timeout = Duration::from_secs(20);
    spec.deadline = Duration::from_secs(180);
    spec
}

async fn visibility_timeout(lab: Lab) -> anyhow::Result<ChapterReport> {
    let plan = lab.plan(FaultMix::NONE);

    // The misconfiguration: the lease runs out while the PSP still works.
    let misconfigured = |variant| {
        let mut spec = spec(
            &lab,
            variant,
            &plan,
            format!("misconfigured: timeout {} < work", seconds(TOO_SHORT)),
        );
        spec.visibility_timeout = TOO_SHORT;
        spec.max_receive_count = 4;
        spec
    };
    let naive_short = lab.run(misconfigured(Variant::Naive)).await?;
    let hardened_short = lab.run(misconfigured(Variant::Hardened)).await?;

    // Sized from what the hardened consumers measured: the receive-to-settle
    // time of the deliveries that charged.
    anyhow::ensure!(
        hardened_short.charge_time_p99_ms > 0,
        "the misconfigured run charged nothing, so there is no p99 to size from"
    );
    let sized_timeout = sized(hardened_short.charge_time_p99_ms);
    eprintln!(
        "charge time p99 {} ms × {MARGIN} → visibility timeout {}",
        hardened_short.charge_time_p99_ms,
        seconds(sized_timeout)
    );
    let sized_spec = |scenario: String| {
        let mut spec = spec(&lab, Variant::Hardened, &plan, scenario);
        spec.visibility_timeout = sized_timeout;
        spec
    };
    let sized_run = lab
        .run(sized_spec(format!(
            "sized: timeout {} (p99 × {MARGIN})",
            seconds(sized_timeout)
        )))
        .await?;

    // A tail the sizing never saw: some charges outlast even the sized lease.
    let slow = sized_timeout + SLOW_BEYOND_LEASE;
    let slow_orders = evenly_spread(&plan, SLOW_SHARE);
    let with_tail = |heartbeat: Option<Heartbeat>| {
        let mut spec = sized_spec(format!(
            "sized, {} of {} charges take {}{}",
            slow_orders.len(),
            plan.orders.len(),
            seconds(slow),
            if heartbeat.is_some() {
                ", heartbeat"
            } else {
                ", no heartbeat"
            }
        ));
        spec.psp_faults.slow_orders = slow_orders.clone();
        spec.psp_faults.slow_latency = slow;
        spec.heartbeat = heartbeat;
        spec
    };
    let tail_bare = lab.run(with_tail(None)).await?;
    let heartbeat = Heartbeat::for_lease(sized_timeout);
    let tail_heartbeat = lab.run(with_tail(Some(heartbeat))).await?;

    // Poison, with the sized lease and the heartbeat.
    let mut poisoned = ChaosPlan::generate(lab.seed, (lab.messages / 2).max(4), FaultMix::NONE);
    // The 422 of chapter 3: the first attempt charges and dies before its
    // commit while a copy with another amount waits on its dedup row.
    let altered = poisoned.orders[0].order_id;
    poisoned.orders[0].producer_fault = Some(ProducerFault::RepublishedAltered);
    poisoned.orders[0].consumer_crash = Some(CrashPoint::AfterChargeBeforeCommit);
    let killer = uuid::Uuid::from_u128(u128::from(lab.seed) << 64 | 0xdead);
    poisoned.poison = vec![
        Poison::Malformed {
            body: r#"{"event_id": "not a payment event"#.to_owned(),
        },
        Poison::KillsEveryConsumer { order_id: killer },
    ];
    let mut poison_spec = sized_spec(format!(
        "poison: malformed, 422, kills its consumer; maxReceiveCount {POISON_MAX_RECEIVES}"
    ));
    poison_spec.plan = poisoned;
    poison_spec.heartbeat = Some(heartbeat);
    poison_spec.max_receive_count = POISON_MAX_RECEIVES;
    poison_spec.trace_orders = vec![altered, killer];
    let poison = lab.run(poison_spec).await?;

    let claims = claims(
        &naive_short,
        &hardened_short,
        &sized_run,
        &tail_bare,
        &tail_heartbeat,
        &poison,
    );
    let runs = vec![
        naive_short,
        hardened_short,
        sized_run,
        tail_bare,
        tail_heartbeat,
        poison,
    ];
    let poison = runs.last().expect("the poison run");
    let dead_letters = poison.dead_letter_lines();
    let traces = poison.trace_lines();
    Ok(lab
        .report(runs.clone(), claims)
        .with_lease_table()
        .with_section("The poison run's dead-letter queue", dead_letters)
        .with_section("The poison run's traces", traces))
}

/// `share` of the plan's orders (at least one), spread evenly over it and
/// ending with the last order. The last one matters: when it runs long, the
/// other consumers have nothing left to do, so one of them is sure to be
/// polling when its lease runs out.
fn evenly_spread(plan: &ChaosPlan, share: f64) -> std::collections::BTreeSet<String> {
    let total = plan.orders.len();
    let wanted = ((share * total as f64).round() as usize).clamp(1, total.max(1));
    (0..wanted)
        .filter_map(|i| plan.orders.get(total - 1 - i * total / wanted))
        .map(|order| order.order_id.to_string())
        .collect()
}

/// The sizing rule: p99 × margin, rounded up to whole seconds (SQS's unit).
fn sized(p99_ms: u64) -> Duration {
    let millis = (p99_ms as f64 * MARGIN).ceil() as u64;
    Duration::from_secs(millis.div_ceil(1000).max(1))
}

fn seconds(duration: Duration) -> String {
    format!("{} s", duration.as_secs_f64())
}

fn claims(
    naive_short: &RunReport,
    hardened_short: &RunReport,
    sized: &RunReport,
    tail_bare: &RunReport,
    tail_heartbeat: &RunReport,
    poison: &RunReport,
) -> Vec<Claim> {
    let money_right = |run: &RunReport| run.double_charges == 0 && run.lost_events == 0;
    let reasons = |needle: &str| {
        poison
            .dead_letters
            .iter()
            .filter(|letter| letter.reason.contains(needle))
            .count()
    };
    vec![
        Claim::new(
            "timeout below the work: the naive consumers double-charge on the redeliveries",
            naive_short.double_charges > 0 && naive_short.redeliveries > 0,
        ),
        Claim::new(
            "timeout below the work: dedup + key keep every order charged once, and the redeliveries, dedup hits and late acks show the waste",
            money_right(hardened_short)
                && hardened_short.redeliveries > 0
                && hardened_short.dedup_hits > 0
                && hardened_short.settled_late > 0,
        ),
        Claim::new(
            "sized from the measured p99: redeliveries fall to about zero (at most one in twenty deliveries), money right",
            money_right(sized) && sized.redeliveries * 20 <= sized.deliveries,
        ),
        Claim::new(
            "a slow tail beyond the sized lease is redelivered without a heartbeat",
            money_right(tail_bare) && tail_bare.redeliveries > 0,
        ),
        Claim::new(
            "the heartbeat keeps the slow tail's leases: fewer redeliveries than without it, money right",
            money_right(tail_heartbeat)
                && tail_heartbeat.lease_extensions > 0
                && tail_heartbeat.redeliveries * 20 <= tail_heartbeat.deliveries
                && tail_heartbeat.redeliveries < tail_bare.redeliveries,
        ),
        Claim::new(
            "poison: the malformed message, the 422 and the message that kills its consumer are all in the dead-letter queue with their reasons",
            poison.dead_letters.len() == 3
                && reasons("undecodable") == 1
                && reasons("422") == 1
                && reasons("maxReceiveCount") == 1,
        ),
        Claim::new(
            "poison: the consumers kept going, every real order charged exactly once",
            // The message that kills its consumer did so on every receive
            // but the last; the supervisor restarted each killed process.
            money_right(poison) && poison.consumer_kills >= u64::from(POISON_MAX_RECEIVES - 1),
        ),
    ]
}
