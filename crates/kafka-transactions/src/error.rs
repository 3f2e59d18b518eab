//! The crate's errors: what failed, and while doing what.

use std::path::PathBuf;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// Everything a measurement of this crate can fail with.
#[derive(Debug, thiserror::Error)]
pub enum KafkaTransactionsError {
    /// librdkafka refused or failed an operation.
    #[error("{doing}: {source}")]
    Kafka {
        doing: String,
        #[source]
        source: KafkaError,
    },
    /// The broker refused an admin operation on one topic or group.
    #[error("{doing} {name}: {code}")]
    Admin {
        doing: &'static str,
        name: String,
        code: RDKafkaErrorCode,
    },
    /// The broker did not acknowledge a record.
    #[error("a record was not delivered ({doing}): {reason}")]
    Delivery { doing: String, reason: String },
    /// A parameter makes the run meaningless (zero messages, no modes, …).
    #[error("invalid parameters: {0}")]
    InvalidConfig(String),
    /// Starting, signalling or reading the transformer process failed.
    #[error("the transformer process: {doing}: {source}")]
    Process {
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The transformer process kept failing on its own (not our SIGKILL).
    #[error(
        "the transformer process failed {failures} times in a row (last: {exit}); \
         its last lines on stderr:\n{stderr}"
    )]
    TransformerFailing {
        failures: u32,
        exit: String,
        stderr: String,
    },
    /// The job handed to a transformer process could not be read.
    #[error("the transformer job in {env} is not valid: {source}")]
    Job {
        env: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// A reader of the output saw something it cannot account for.
    #[error("reading {topic}: {detail}")]
    Reader { topic: String, detail: String },
    /// The chart could not be drawn or written.
    #[error("drawing the chart {path}: {detail}")]
    Chart { path: PathBuf, detail: String },
    /// A blocking measurement thread panicked.
    #[error("{0} panicked")]
    Panicked(&'static str),
}

pub type Result<T, E = KafkaTransactionsError> = std::result::Result<T, E>;

/// Attaches "while doing what" to a librdkafka error.
pub(crate) trait Doing<T> {
    fn doing(self, doing: impl Into<String>) -> Result<T>;
}

impl<T> Doing<T> for Result<T, KafkaError> {
    fn doing(self, doing: impl Into<String>) -> Result<T> {
        self.map_err(|source| KafkaTransactionsError::Kafka {
            doing: doing.into(),
            source,
        })
    }
}
