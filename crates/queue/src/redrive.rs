//! Moving messages from an SQS dead-letter queue back to its main queue, the
//! way `runbook/dlq-redrive.md` says to.
//!
//! 1. **Snapshot** ([`Redrive::snapshot`]): every DLQ message is received
//!    (hidden for [`RedriveOptions::visibility_timeout`]), written as one JSON
//!    line to the snapshot file, and made visible again. Nothing is deleted.
//! 2. **Sample**: the first [`RedriveOptions::sample`] entries, with their
//!    reasons, are for the operator to audit. A dry run stops here.
//! 3. **Move** ([`Redrive::run`]): at most [`RedriveOptions::rate`] messages
//!    per second, each one sent to the main queue first and deleted from the
//!    DLQ only after that send succeeded. A failed send leaves the message in
//!    the DLQ; a failed delete after a good send leaves it in both queues,
//!    which the consumer's dedup absorbs. Nothing is deleted that was not
//!    moved.
//!
//! Only messages in the snapshot are moved: one that reaches the DLQ during
//! the redrive is left there for the next audit.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use aws_sdk_sqs::types::{Message, MessageAttributeValue, MessageSystemAttributeName};
use serde::{Deserialize, Serialize};

use crate::sqs::{SqsBroker, DEAD_LETTER_REASON_ATTRIBUTE, MAX_BATCH, MESSAGE_ID_ATTRIBUTE};

/// One line of the snapshot file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEntry {
    /// SQS's id of the DLQ copy.
    pub sqs_message_id: String,
    /// The publisher's `message-id` attribute, when it travelled along.
    pub message_id: Option<String>,
    /// The `dead-letter-reason` attribute; empty when the redrive policy
    /// moved the message (SQS gives no reason).
    pub reason: String,
    pub body: String,
    /// `ApproximateReceiveCount` of the DLQ copy, the snapshot's receive
    /// included.
    pub receive_count: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct RedriveOptions {
    /// Where the snapshot goes. Must not exist yet: an earlier snapshot is
    /// evidence and is never overwritten.
    pub snapshot: PathBuf,
    /// How many snapshot entries [`Snapshot::sample`] returns.
    pub sample: usize,
    /// Messages per second while moving (> 0).
    pub rate: f64,
    /// Move at most this many (and snapshot at most this many).
    pub max: Option<usize>,
    /// How long each receive hides a DLQ message (whole seconds). Must be
    /// longer than the time one receive batch takes to move at `rate`.
    pub visibility_timeout: Duration,
}

impl RedriveOptions {
    pub fn new(snapshot: impl Into<PathBuf>) -> Self {
        Self {
            snapshot: snapshot.into(),
            sample: 5,
            rate: 10.0,
            max: None,
            visibility_timeout: Duration::from_secs(30),
        }
    }
}

/// What the snapshot step saw.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub path: PathBuf,
    pub entries: Vec<SnapshotEntry>,
    sample: usize,
}

impl Snapshot {
    /// The first entries, for the operator's audit.
    pub fn sample(&self) -> &[SnapshotEntry] {
        &self.entries[..self.sample.min(self.entries.len())]
    }
}

/// The counts the operator checks after a redrive.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedriveReport {
    pub snapshotted: usize,
    /// Sent to the main queue and deleted from the DLQ.
    pub moved: usize,
    /// Not sent: still in the DLQ.
    pub failed: usize,
    /// Sent, but the delete from the DLQ failed: in both queues.
    pub duplicates_possible: usize,
    /// One line per failure, naming the message.
    pub errors: Vec<String>,
}

/// A redrive from one DLQ (by URL) to one main queue (by URL).
pub struct Redrive {
    broker: SqsBroker,
    dlq_url: String,
    target_url: String,
    options: RedriveOptions,
}

impl Redrive {
    /// Resolves both queue names to URLs (both must exist).
    pub async fn by_name(
        broker: &SqsBroker,
        dead_letter_queue: &str,
        target_queue: &str,
        options: RedriveOptions,
    ) -> anyhow::Result<Self> {
        let dlq_url = broker
            .queue_url(dead_letter_queue)
            .await
            .with_context(|| format!("dead-letter queue {dead_letter_queue:?}"))?;
        let target_url = broker
            .queue_url(target_queue)
            .await
            .with_context(|| format!("main queue {target_queue:?}"))?;
        Self::by_url(broker, dlq_url, target_url, options)
    }

    pub fn by_url(
        broker: &SqsBroker,
        dlq_url: impl Into<String>,
        target_url: impl Into<String>,
        options: RedriveOptions,
    ) -> anyhow::Result<Self> {
        if !(options.rate.is_finite() && options.rate > 0.0) {
            bail!("the rate must be a positive number of messages per second");
        }
        if options.visibility_timeout < Duration::from_secs(1) {
            bail!("the visibility timeout must be at least 1 s");
        }
        Ok(Self {
            broker: broker.clone(),
            dlq_url: dlq_url.into(),
            target_url: target_url.into(),
            options,
        })
    }

    fn limit(&self) -> usize {
        self.options.max.unwrap_or(usize::MAX)
    }

    fn visibility_seconds(&self) -> i32 {
        let t = self.options.visibility_timeout;
        let seconds = t.as_secs() + u64::from(t.subsec_nanos() > 0);
        i32::try_from(seconds.min(12 * 60 * 60)).unwrap_or(i32::MAX)
    }

    async fn receive(&self, max: usize) -> anyhow::Result<Vec<Message>> {
        let output = self
            .broker
            .client()
            .receive_message()
            .queue_url(&self.dlq_url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH) as i32)
            .visibility_timeout(self.visibility_seconds())
            .wait_time_seconds(0)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sqs::error::DisplayErrorContext(e)))
            .context("ReceiveMessage from the dead-letter queue")?;
        Ok(output.messages.unwrap_or_default())
    }

    async fn release(&self, messages: &[Message]) -> anyhow::Result<()> {
        for message in messages {
            let Some(handle) = message.receipt_handle() else {
                continue;
            };
            self.broker
                .client()
                .change_message_visibility()
                .queue_url(&self.dlq_url)
                .receipt_handle(handle)
                .visibility_timeout(0)
                .send()
                .await
                .map_err(|e| anyhow::anyhow!("{}", aws_sdk_sqs::error::DisplayErrorContext(e)))
                .context("ChangeMessageVisibility(0) on the dead-letter queue")?;
        }
        Ok(())
    }

    /// Step 1: reads every DLQ message (up to `max`) without deleting it and
    /// writes the snapshot file. Refuses to overwrite an existing file.
    pub async fn snapshot(&self) -> anyhow::Result<Snapshot> {
        let path = &self.options.snapshot;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot create the snapshot file {} (it must not exist yet)",
                    path.display()
                )
            })?;
        let mut held = Vec::new();
        let mut entries = Vec::new();
        let mut seen = HashSet::new();
        let result: anyhow::Result<()> = async {
            while entries.len() < self.limit() {
                let batch = self.receive(self.limit() - entries.len()).await?;
                if batch.is_empty() {
                    break;
                }
                for message in batch {
                    let entry = entry_of(&message);
                    // Hidden messages are not handed out twice, but a lease
                    // that ran out would be: count each message once.
                    if seen.insert(entry.sqs_message_id.clone()) {
                        writeln!(file, "{}", serde_json::to_string(&entry)?)
                            .with_context(|| format!("writing {}", path.display()))?;
                        entries.push(entry);
                    }
                    held.push(message);
                }
            }
            file.sync_all()
                .with_context(|| format!("syncing {}", path.display()))?;
            Ok(())
        }
        .await;
        // Visible again either way, so nothing waits for the lease.
        let released = self.release(&held).await;
        result?;
        released?;
        Ok(Snapshot {
            path: path.clone(),
            entries,
            sample: self.options.sample,
        })
    }

    /// Step 3: moves the messages of `snapshot`, send first, delete second,
    /// at the configured rate.
    pub async fn run(&self, snapshot: &Snapshot) -> anyhow::Result<RedriveReport> {
        let mut report = RedriveReport {
            snapshotted: snapshot.entries.len(),
            ..RedriveReport::default()
        };
        let mut pending: HashSet<&str> = snapshot
            .entries
            .iter()
            .map(|e| e.sqs_message_id.as_str())
            .collect();
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / self.options.rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Every message received here stays hidden until its lease runs out
        // (moved ones are gone), so the loop ends at the first empty receive.
        while !pending.is_empty() {
            let batch = self.receive(pending.len()).await?;
            if batch.is_empty() {
                break;
            }
            for message in batch {
                let entry = entry_of(&message);
                // Not in the snapshot (arrived later): left hidden until its
                // lease runs out, then visible in the DLQ again.
                if !pending.remove(entry.sqs_message_id.as_str()) {
                    continue;
                }
                ticks.tick().await;
                self.move_one(&message, &entry, &mut report).await;
            }
        }
        Ok(report)
    }

    async fn move_one(&self, message: &Message, entry: &SnapshotEntry, report: &mut RedriveReport) {
        let who = entry
            .message_id
            .clone()
            .unwrap_or_else(|| entry.sqs_message_id.clone());
        let mut send = self
            .broker
            .client()
            .send_message()
            .queue_url(&self.target_url)
            .message_body(&entry.body);
        if let Some(id) = string_attribute_of(message, MESSAGE_ID_ATTRIBUTE) {
            match MessageAttributeValue::builder()
                .data_type("String")
                .string_value(id)
                .build()
            {
                Ok(value) => send = send.message_attributes(MESSAGE_ID_ATTRIBUTE, value),
                Err(e) => {
                    report.failed += 1;
                    report.errors.push(format!("{who}: not sent: {e}"));
                    return;
                }
            }
        }
        if let Err(e) = send.send().await {
            report.failed += 1;
            report.errors.push(format!(
                "{who}: not sent, still in the DLQ: {}",
                aws_sdk_sqs::error::DisplayErrorContext(e)
            ));
            return;
        }
        let deleted = match message.receipt_handle() {
            Some(handle) => self
                .broker
                .client()
                .delete_message()
                .queue_url(&self.dlq_url)
                .receipt_handle(handle)
                .send()
                .await
                .map(|_| ())
                .map_err(|e| aws_sdk_sqs::error::DisplayErrorContext(e).to_string()),
            None => Err("no receipt handle".to_owned()),
        };
        match deleted {
            Ok(()) => report.moved += 1,
            Err(e) => {
                report.duplicates_possible += 1;
                report.errors.push(format!(
                    "{who}: moved but still in the DLQ (duplicate possible): {e}"
                ));
            }
        }
    }
}

/// Reads a snapshot file back.
pub fn read_snapshot(path: &Path) -> anyhow::Result<Vec<SnapshotEntry>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line).with_context(|| format!("{} line {}", path.display(), i + 1))
        })
        .collect()
}

fn string_attribute_of(message: &Message, name: &str) -> Option<String> {
    message
        .message_attributes()
        .and_then(|attributes| attributes.get(name))
        .and_then(|value| value.string_value())
        .map(str::to_owned)
}

fn entry_of(message: &Message) -> SnapshotEntry {
    SnapshotEntry {
        sqs_message_id: message.message_id().unwrap_or_default().to_owned(),
        message_id: string_attribute_of(message, MESSAGE_ID_ATTRIBUTE),
        reason: string_attribute_of(message, DEAD_LETTER_REASON_ATTRIBUTE).unwrap_or_default(),
        body: message.body().unwrap_or_default().to_owned(),
        receive_count: message
            .attributes()
            .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
            .and_then(|count| count.parse().ok()),
    }
}
