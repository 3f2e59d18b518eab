//! Leg 2, measured: what a broker loses of the messages it confirmed, setting
//! against setting, from the PSP's ledger and the shop's orders.
//!
//! `cargo run -p chaos-lab --bin broker-loss -- [--backend B | --every-backend]
//!  [--seeds N] [--seed S] [--messages M] [--hold-secs H] [--stall-secs S]`
//!
//! RabbitMQ runs restart the shared broker (scripts/outage): run it alone,
//! never beside the tests or a chapter. Kafka runs start and use a
//! three-broker cluster of their own (scripts/kafka-cluster).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chaos_lab::broker_loss::{self, Case, Row, Settings, HEADER};
use chaos_lab::{Chapter, ChapterReport, Lab};
use queue::backend::BackendKind;

static LEG2: Chapter = Chapter {
    id: "broker-loss",
    title: "Leg 2: loss inside the broker",
    default_messages: 200,
    backends: &[BackendKind::Rabbitmq, BackendKind::Kafka],
};

#[derive(Debug, Clone, clap::Args)]
struct Leg2Args {
    /// Run on RabbitMQ and on the Kafka cluster in turn.
    #[arg(long)]
    every_backend: bool,
    /// Seeds per case: --seed, --seed + 1, ...
    #[arg(long, default_value_t = 1)]
    seeds: u64,
    /// How long RabbitMQ, or the killed Kafka leader, stays down, in seconds.
    #[arg(long, default_value_t = 5)]
    hold_secs: u64,
    /// How long the Kafka followers stall before the leader is killed, in
    /// seconds. Shorter than the controller's 6 s broker session, so that
    /// they stay in sync on paper while they copy nothing.
    #[arg(long, default_value_t = 2)]
    stall_secs: u64,
    /// The three-broker Kafka cluster (scripts/kafka-cluster).
    #[arg(
        long,
        env = "EO_KAFKA_CLUSTER_BROKERS",
        default_value = "127.0.0.1:19092,127.0.0.1:19093,127.0.0.1:19094"
    )]
    kafka_cluster: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    chaos_lab::chapter::main_with_args(&LEG2, leg2).await
}

async fn leg2(lab: Lab, args: Leg2Args) -> anyhow::Result<ChapterReport> {
    let backends = if args.every_backend {
        LEG2.backends.to_vec()
    } else {
        vec![lab.backend]
    };
    let settings = Settings {
        messages: lab.messages,
        hold: Duration::from_secs(args.hold_secs),
        stall: Duration::from_secs(args.stall_secs),
        kafka_cluster: args.kafka_cluster.clone(),
    };
    let cases: Vec<Case> = backends
        .iter()
        .flat_map(|&backend| Case::all_on(backend, &settings))
        .collect();
    anyhow::ensure!(
        !cases.is_empty(),
        "Leg 2 is measured on RabbitMQ and Kafka: SQS's durability is not a setting, \
         and ElasticMQ, a test server, says nothing about it"
    );
    if backends.contains(&BackendKind::Kafka) {
        eprintln!("starting the three-broker Kafka cluster ...");
        chaos_lab::outage::kafka_cluster("up", None)
            .await
            .context("starting the Kafka cluster (scripts/kafka-cluster up)")?;
    }
    let mut runs = Vec::new();
    for &case in &cases {
        let lab = lab.on(case.backend);
        for seed in lab.seed..lab.seed + args.seeds {
            let what = format!(
                "{} on {} ({}), seed {seed}",
                case.outage.name(case.backend),
                case.backend.name(),
                case.setting()
            );
            eprintln!("{what}");
            let run = lab
                .run(broker_loss::spec(case, seed, &settings))
                .await
                .context(what)?;
            runs.push((case, run));
        }
    }
    let rows: Vec<Row<'_>> = cases
        .iter()
        .map(|&case| Row {
            case,
            runs: runs
                .iter()
                .filter(|(c, _)| *c == case)
                .map(|(_, run)| run)
                .collect(),
        })
        .collect();
    let claims = broker_loss::claims(&rows);
    let table: Vec<Vec<String>> = rows.iter().map(Row::cells).collect();
    drop(rows);
    let runs: Vec<_> = runs.into_iter().map(|(_, run)| run).collect();
    let mut report = lab.report(Vec::new(), claims).with_table(
        "Hardened pipeline, one broker setting against another; counted from the PSP's ledger and the shop's orders",
        &HEADER,
        table,
    );
    report.messages = lab.messages;
    report
        .measurements
        .insert("runs".to_owned(), serde_json::to_value(&runs)?);
    Ok(report)
}
