//! A dead-letter queue that refuses the copy (on SQS: a body near 256 KiB
//! plus the reason's attributes) must not end the consumer, and must not
//! lose the message: it is handed back, and the consumer carries on.
//!
//! The receiver here is a stand-in that refuses every dead letter; the real
//! SQS backend fits its attributes around the body (see
//! `queue::sqs::dead_letter_attributes`) and only refuses what cannot fit.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use consumer::crash::NeverCrash;
use consumer::observe::{Outcome, Unobserved};
use consumer::{PaymentConsumer, Variant};
use psp::client::PspClient;
use queue::{Delivery, QueueError, Receipt, Receiver};

#[derive(Default)]
struct RefusingDeadLetters {
    settled: Arc<Mutex<Vec<&'static str>>>,
}

#[async_trait::async_trait]
impl Receiver for RefusingDeadLetters {
    async fn receive(&mut self, _: usize, _: Duration) -> Result<Vec<Delivery>, QueueError> {
        Ok(Vec::new())
    }
    async fn ack(&mut self, _: &Delivery) -> Result<(), QueueError> {
        self.settled.lock().unwrap().push("ack");
        Ok(())
    }
    async fn requeue(&mut self, _: &Delivery) -> Result<(), QueueError> {
        self.settled.lock().unwrap().push("requeue");
        Ok(())
    }
    async fn dead_letter(&mut self, _: &Delivery, _: &str) -> Result<(), QueueError> {
        Err(QueueError::DeadLetterRefused {
            reason: "InvalidParameterValue: MessageTooLong".into(),
        })
    }
    async fn extend_lease(&mut self, _: &Delivery, _: Duration) -> Result<(), QueueError> {
        Ok(())
    }
}

#[tokio::test]
async fn a_refused_dead_letter_is_handed_back_and_the_consumer_carries_on() {
    // Neither is contacted: an undecodable payload never reaches them.
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_lazy("postgres://nobody@127.0.0.1:1/none")
        .unwrap();
    let psp = PspClient::new("http://127.0.0.1:1", "key", Duration::from_secs(1)).unwrap();
    for variant in [Variant::Naive, Variant::Hardened] {
        let consumer = PaymentConsumer {
            variant,
            pool: pool.clone(),
            psp: psp.clone(),
            crashes: Arc::new(NeverCrash),
            observer: Arc::new(Unobserved),
            requeue_delay: Duration::from_millis(1),
            metrics: Default::default(),
            heartbeat: None,
            max_receives: None,
            batch_size: 1,
        };
        let mut receiver = RefusingDeadLetters::default();
        let delivery = Delivery {
            payload: vec![b' '; 256 * 1024],
            message_id: None,
            redelivered: false,
            delivery_count: None,
            receipt: Receipt::ReceiptHandle("r".into()),
        };
        let outcome = consumer
            .handle(&mut receiver, delivery)
            .await
            .expect("the consumer does not end on a refused dead letter");
        assert!(
            matches!(&outcome, Outcome::Requeued { reason } if reason.contains("MessageTooLong")),
            "{outcome:?}"
        );
        assert_eq!(*receiver.settled.lock().unwrap(), ["requeue"]);
    }
}
