//! `producer`: the shop, placing orders by hand.
//!
//! Places `--count` orders, or one per line read from stdin, and prints each
//! order id on stdout as it commits. With `--via outbox` (the default) each
//! order and its payment event commit in one transaction and a `relay`
//! publishes the event; `--via direct` is chapter 1's broken dual write
//! (commit, then publish), kept for teaching.

use std::io::{BufRead, Write};
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};
use queue::backend::{Broker, QueueArgs};
use serde::Deserialize;
use shop::naive_producer::{self, NoFaults, Placed};
use shop::{outbox_producer, Order};
use uuid::Uuid;

/// Places orders in the shop database; each one asks the payment consumer
/// to charge it once.
#[derive(Parser)]
#[command(name = "producer", version)]
struct Args {
    /// Orders to place, all with `--amount-cents` and `--currency`.
    #[arg(long, conflicts_with = "stdin", required_unless_present = "stdin")]
    count: Option<u64>,
    /// Read orders from stdin instead, one JSON object per line:
    /// `{"amount_cents": 1999, "currency": "EUR"}`, with an optional
    /// `"order_id"` (a UUID). A line that is not a valid order is reported
    /// with its number and skipped; the exit status is then 1.
    #[arg(long)]
    stdin: bool,
    #[arg(long, default_value_t = 1999)]
    amount_cents: i64,
    #[arg(long, default_value = "EUR")]
    currency: String,
    /// Milliseconds between orders.
    #[arg(long, default_value_t = 0)]
    pace_ms: u64,
    /// How the payment event leaves the shop.
    #[arg(long, env = "EO_PRODUCER_VIA", value_enum, default_value = "outbox")]
    via: Via,
    /// The shop database. Default: the `shop` database on the book's
    /// Postgres (`EO_PG_ADMIN_URL`), created if missing.
    #[arg(long, env = "EO_SHOP_DATABASE_URL", hide_env_values = true)]
    database_url: Option<String>,
    /// The queue, for `--via direct` only (the relay publishes outbox rows).
    #[command(flatten)]
    queue: QueueArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Via {
    /// The order and its event in one transaction; a relay publishes it.
    Outbox,
    /// Commit, then publish: loses the event if the publish fails or the
    /// process dies in between (chapter 1).
    Direct,
}

/// One line of `--stdin`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OrderLine {
    order_id: Option<Uuid>,
    amount_cents: i64,
    currency: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<std::process::ExitCode> {
    telemetry::service::init_logging("info");
    let args = Args::parse();
    let url = databases::Location::given_or(args.database_url.clone(), "shop")
        .resolve()
        .await
        .context("finding the shop database")?;
    let pool = databases::connect(&url, 2).await?;
    shop::migrate(&pool)
        .await
        .context("migrating the shop's tables")?;
    let publisher = match args.via {
        Via::Outbox => None,
        Via::Direct => {
            let spec = args.queue.spec();
            let broker = Broker::connect_for(&spec).await?;
            broker.declare(&spec).await?;
            Some(broker.publisher(&spec).await?)
        }
    };

    let orders: Box<dyn Iterator<Item = Result<Order, String>>> = match args.count {
        Some(count) => {
            let (amount_cents, currency) = (args.amount_cents, args.currency.clone());
            Box::new((0..count).map(move |_| {
                checked(Order {
                    order_id: Uuid::new_v4(),
                    amount_cents,
                    currency: currency.clone(),
                })
            }))
        }
        None => Box::new(std::io::stdin().lock().lines().enumerate().filter_map(
            |(index, line)| {
                let line = match line {
                    Ok(line) => line,
                    Err(error) => return Some(Err(format!("line {}: {error}", index + 1))),
                };
                if line.trim().is_empty() {
                    return None;
                }
                Some(
                    serde_json::from_str::<OrderLine>(&line)
                        .map_err(|error| error.to_string())
                        .and_then(|order| {
                            checked(Order {
                                order_id: order.order_id.unwrap_or_else(Uuid::new_v4),
                                amount_cents: order.amount_cents,
                                currency: order.currency,
                            })
                        })
                        .map_err(|error| format!("line {}: {error}", index + 1)),
                )
            },
        )),
    };

    let (mut placed, mut refused, mut unpublished) = (0u64, 0u64, 0u64);
    let mut out = std::io::stdout().lock();
    for order in orders {
        let order = match order {
            Ok(order) => order,
            Err(error) => {
                tracing::error!("not placed: {error}");
                refused += 1;
                continue;
            }
        };
        if args.pace_ms > 0 {
            tokio::time::sleep(Duration::from_millis(args.pace_ms)).await;
        }
        match &publisher {
            None => outbox_producer::place_order(&pool, &NoFaults, &order).await,
            Some(publisher) => naive_producer::place_order(&pool, &**publisher, &NoFaults, &order)
                .await
                .map(|outcome| {
                    if outcome == Placed::PublishFailed {
                        unpublished += 1;
                    }
                }),
        }
        .with_context(|| format!("placing order {}", order.order_id))?;
        placed += 1;
        writeln!(out, "{}", order.order_id)?;
    }
    out.flush()?;
    tracing::info!(
        "placed {placed} orders{}{}",
        if refused > 0 {
            format!(", refused {refused} lines")
        } else {
            String::new()
        },
        if unpublished > 0 {
            format!(", {unpublished} committed but never published (the dual write lost them)")
        } else {
            String::new()
        },
    );
    Ok(if refused > 0 {
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    })
}

/// The same rules the consumer applies to the event (a positive amount up
/// to the maximum, an ISO 4217 currency): the shop does not promise an
/// order it could never charge.
fn checked(order: Order) -> Result<Order, String> {
    order
        .payment_event(chrono::Utc::now())
        .validate()
        .map_err(|error| error.to_string())?;
    Ok(order)
}
