"""The NAIVE payment consumer: chapter 1 of "Effectively Once", in Python.

Receive one message, decode it, charge the PSP (no Idempotency-Key), insert
a row into `payments`, then settle (RabbitMQ ack, SQS delete, Kafka commit).
It has no dedup, so the grader will catch it double-charging: a process
killed after the charge and before the settle leaves the message to be
delivered again, and the retry charges again. That is the point. Copy it and
fix it: chapter 2 (INSERT-first dedup), chapter 3 (Idempotency-Key), and
for SQS chapter 5 (the visibility heartbeat).

Everything else is honest: a body that is not a payment event, or a charge
the PSP refuses (4xx), goes to the dead-letter queue with its reason; a PSP
timeout, connection error or 5xx hands the message back to be retried.

Run it from this folder, or your copy of it (the grader sets every EO_*
variable: book/consumer-contract.md; Python 3.11 or later):

    python3 -m venv .venv && .venv/bin/pip install -r requirements.txt
    cargo run -p grader -- --consumer '.venv/bin/python naive_consumer.py' --backend rabbitmq

SIGTERM finishes the message in hand and exits 0. One log line per message,
on stderr.
"""

import datetime
import json
import logging
import os
import re
import signal
import sys
import time
import urllib.error
import urllib.request
import uuid

import psycopg

log = logging.getLogger("naive")
ENV = os.environ.get
QUEUE = os.environ["EO_QUEUE"]
FIELDS = {"event_id", "order_id", "amount_cents", "currency", "created_at"}
stopping = False


class Refused(Exception):
    """Can never succeed: dead-letter it, with this reason."""


class TryLater(Exception):
    """May succeed later: hand the message back."""


def decode(body):
    """The payment event (book/payment-event.md), or Refused with the reason."""
    try:
        event = json.loads(body)
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise Refused(f"undecodable payment event: not JSON: {e}")
    if not isinstance(event, dict) or set(event) != FIELDS:
        got = sorted(event) if isinstance(event, dict) else type(event).__name__
        raise Refused(f"undecodable payment event: want fields {sorted(FIELDS)}, got {got}")
    try:
        uuid.UUID(event["event_id"])
        uuid.UUID(event["order_id"])
        datetime.datetime.fromisoformat(event["created_at"])
    except (TypeError, ValueError, AttributeError) as e:
        raise Refused(f"undecodable payment event: {e}")
    amount = event["amount_cents"]
    if type(amount) is not int or not 1 <= amount <= 100_000_000:
        raise Refused(f"undecodable payment event: amount_cents must be 1 to 100000000, got {amount!r}")
    if not isinstance(event["currency"], str) or not re.fullmatch(r"[A-Z]{3}", event["currency"]):
        raise Refused(f"undecodable payment event: currency must be three upper-case letters, got {event['currency']!r}")
    return event


def charge(event):
    """POST /v1/charges with NO Idempotency-Key: every call moves money."""
    request = urllib.request.Request(
        ENV("EO_PSP_URL", "http://127.0.0.1:4242") + "/v1/charges",
        method="POST",
        data=json.dumps({k: event[k] for k in ("order_id", "amount_cents", "currency")}).encode(),
        headers={"Authorization": "Bearer " + ENV("EO_PSP_API_KEY", "sk_test_effectively_once"),
                 "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=int(ENV("EO_PSP_TIMEOUT_MS", "5000")) / 1000) as response:
            return json.load(response)["id"]
    except urllib.error.HTTPError as e:
        answer = f"{e.code} {e.read().decode(errors='replace')[:300]}"
        if e.code in (401, 403):  # no message will ever pass: stop (after handing it back)
            raise SystemExit(f"the PSP refused our API key: {answer}")
        if 400 <= e.code < 500 and e.code not in (409, 429):
            raise Refused(f"the PSP refused the charge: {answer}")
        raise TryLater(f"the PSP answered {answer}")
    except (OSError, ValueError, KeyError) as e:  # timeout, connection refused, odd body
        raise TryLater(f"no answer from the PSP: {e!r}")  # money may have moved!


def open_database():
    db = psycopg.connect(os.environ["EO_SHOP_DATABASE_URL"], autocommit=True)
    with db.transaction():  # several processes start at once: one creates
        db.execute("SELECT pg_advisory_xact_lock(4242)")
        db.execute("""CREATE TABLE IF NOT EXISTS payments (
            payment_id bigserial PRIMARY KEY, event_id uuid NOT NULL,
            order_id uuid NOT NULL, psp_charge_id text NOT NULL,
            amount_cents bigint NOT NULL, currency text NOT NULL,
            recorded_at timestamptz NOT NULL DEFAULT now())""")
    return db


def process(db, body):
    """What happened, for the log; raises Refused or TryLater."""
    event = decode(body)
    charge_id = charge(event)
    try:
        db.execute("INSERT INTO payments (event_id, order_id, psp_charge_id, amount_cents, currency)"
                   " VALUES (%s, %s, %s, %s, %s)", (event["event_id"], event["order_id"], charge_id,
                                                    event["amount_cents"], event["currency"]))
    except psycopg.Error as e:
        raise TryLater(f"charged {charge_id} but could not record it: {e}")  # and will charge again
    return f"charged {charge_id} for order {event['order_id']}"


class Rabbit:
    def __init__(self):
        import pika
        self.pika = pika
        self.connection = pika.BlockingConnection(pika.URLParameters(
            ENV("EO_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")))
        self.channel = self.connection.channel()
        self.channel.basic_qos(prefetch_count=1)
        self.dead_letters = self.connection.channel()
        self.dead_letters.confirm_delivery()  # the copy is confirmed before the ack
        self.messages = self.channel.consume(QUEUE, inactivity_timeout=1)

    def close(self):
        self.connection.close()  # anything unacked goes back to the queue

    def receive(self):
        method, properties, body = next(self.messages)
        return None if method is None else (body, properties.message_id, (method, properties))

    def ack(self, message):
        self.channel.basic_ack(message[0].delivery_tag)

    def hand_back(self, message):
        self.channel.basic_nack(message[0].delivery_tag, requeue=True)

    def dead_letter(self, body, message, reason):
        method, properties = message
        # mandatory: a DLX bound to no queue raises here instead of dropping the copy.
        self.dead_letters.basic_publish(f"{QUEUE}.dlx", "", body, self.pika.BasicProperties(
            delivery_mode=2, message_id=properties.message_id,
            content_type=properties.content_type, headers={"x-dead-letter-reason": reason}), mandatory=True)
        self.ack(message)


class Sqs:
    def __init__(self):
        import boto3
        self.sqs = boto3.client("sqs", endpoint_url=ENV("EO_SQS_ENDPOINT", "http://127.0.0.1:9324"),
                                region_name=ENV("EO_SQS_REGION", "elasticmq"),
                                aws_access_key_id=ENV("EO_SQS_ACCESS_KEY", "x"),
                                aws_secret_access_key=ENV("EO_SQS_SECRET_KEY", "x"))
        self.url = self.sqs.get_queue_url(QueueName=QUEUE)["QueueUrl"]
        self.dlq_url = self.sqs.get_queue_url(QueueName=f"{QUEUE}-dlq")["QueueUrl"]

    def close(self):
        pass  # SQS keeps no connection: nothing is held but the message in hand

    def receive(self):
        got = self.sqs.receive_message(QueueUrl=self.url, MaxNumberOfMessages=1, WaitTimeSeconds=1,
                                       MessageAttributeNames=["All"]).get("Messages", [])
        if not got:
            return None
        message = got[0]
        message_id = message.get("MessageAttributes", {}).get("message-id", {}).get("StringValue")
        return message["Body"], message_id, message

    def ack(self, message):
        self.sqs.delete_message(QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"])

    def hand_back(self, message):  # visible again at once; the receive count goes up
        self.sqs.change_message_visibility(QueueUrl=self.url, ReceiptHandle=message["ReceiptHandle"],
                                           VisibilityTimeout=0)

    def dead_letter(self, body, message, reason):
        self.sqs.send_message(QueueUrl=self.dlq_url, MessageBody=body, MessageAttributes={
            "dead-letter-reason": {"DataType": "String", "StringValue": reason[:1000]}})
        self.ack(message)


class Kafka:
    def __init__(self):
        from confluent_kafka import Consumer, Producer, TopicPartition
        self.TopicPartition = TopicPartition
        brokers = ENV("EO_KAFKA_BROKERS", "127.0.0.1:9092")
        self.consumer = Consumer({
            "bootstrap.servers": brokers, "group.id": ENV("EO_KAFKA_GROUP", f"{QUEUE}.consumers"),
            "enable.auto.commit": False, "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest", "group.protocol": "classic",
            # A killed member's partitions move on after 3 s, not Kafka's 45 s.
            "session.timeout.ms": 3000, "heartbeat.interval.ms": 500})
        self.consumer.subscribe([QUEUE])
        self.producer = Producer({"bootstrap.servers": brokers, "acks": "all", "enable.idempotence": True})

    def close(self):
        self.consumer.close()  # leave the group now: its partitions move at once

    def receive(self):
        message = self.consumer.poll(1.0)
        if message is None or message.error():
            if message is not None:
                log.warning("kafka: %s", message.error())
            return None
        message_id = dict(message.headers() or []).get("message-id", b"").decode(errors="replace") or None
        return message.value() or b"", message_id, message

    def ack(self, message):  # commit the position after this message
        self.consumer.commit(offsets=[self.TopicPartition(
            message.topic(), message.partition(), message.offset() + 1)], asynchronous=False)

    def hand_back(self, message):  # read it again next: seek back
        self.consumer.seek(self.TopicPartition(message.topic(), message.partition(), message.offset()))

    def dead_letter(self, body, message, reason):
        failed = []
        self.producer.produce(f"{QUEUE}.dlq", value=body, key=message.key(),
                              headers=[("dead-letter-reason", reason.encode())],
                              on_delivery=lambda error, _: failed.append(error) if error else None)
        if self.producer.flush(30) or failed:
            raise RuntimeError(f"the dead-letter topic did not take the copy: {failed}")
        self.ack(message)


def stop(signum, _frame):
    global stopping
    stopping = True


def main():
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,  # the clients' chatter: warnings only
                        format=f"%(asctime)s naive[{os.getpid()}] %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    backend = ENV("EO_BACKEND", "rabbitmq")
    broker = {"rabbitmq": Rabbit, "sqs": Sqs, "kafka": Kafka}[backend]()
    db = open_database()
    log.info("consuming %s on %s", QUEUE, backend)
    while not stopping:
        received = broker.receive()
        if received is None:
            continue
        body, message_id, message = received
        try:
            outcome = process(db, body)
            broker.ack(message)
            log.info("%s: %s; settled", message_id, outcome)
        except Refused as e:
            try:
                broker.dead_letter(body, message, str(e))
                log.warning("%s: dead-lettered: %s", message_id, e)
            except Exception as failed:  # never drop it: hand it back instead
                broker.hand_back(message)
                log.error("%s: handed back, the dead-letter queue failed (%r): %s", message_id, failed, e)
        except TryLater as e:
            time.sleep(0.5)  # a short pause, then the broker may give it to anyone
            broker.hand_back(message)
            log.warning("%s: handed back: %s", message_id, e)
            if db.broken or db.closed:
                db = open_database()
        except SystemExit:
            broker.hand_back(message)
            raise
        except Exception as e:  # e.g. a Kafka commit after a rebalance
            log.error("%s: not settled, it will be delivered again: %r", message_id, e)
    broker.close()
    log.info("stopped on SIGTERM, between two messages")


if __name__ == "__main__":
    main()
