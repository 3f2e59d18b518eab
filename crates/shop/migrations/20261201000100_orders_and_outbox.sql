-- A sqlx migration, applied once per database (`shop::migrate`).
-- The shop's side of the shop database. An order row is the promise to the
-- customer: every committed order must be charged exactly once.
CREATE TABLE IF NOT EXISTS orders (
    order_id     uuid PRIMARY KEY,
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    currency     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- ANCHOR: outbox
-- The transactional outbox (chapter 4): the event is written in the same
-- transaction as its order, so either both exist or neither does. A relay
-- publishes pending rows and marks them sent only after the broker confirmed.
CREATE TABLE IF NOT EXISTS outbox (
    id             bigserial PRIMARY KEY,
    event_id       uuid NOT NULL UNIQUE,
    aggregate_type text NOT NULL DEFAULT 'order',
    aggregate_id   uuid NOT NULL,
    event_type     text NOT NULL DEFAULT 'payment_requested',
    -- The wire-format bytes exactly as they will be published.
    payload        text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    -- How many times a relay claimed the row: more than one is a republish.
    attempts       integer NOT NULL DEFAULT 0,
    -- A relay's claim; another relay may take the row once it has passed.
    leased_until   timestamptz,
    sent_at        timestamptz
);
-- ANCHOR_END: outbox
-- The relay's claim reads pending rows in id order; sent rows stay out of
-- the index, so it stays small however long sent rows are kept.
CREATE INDEX IF NOT EXISTS outbox_pending_idx ON outbox (id) WHERE sent_at IS NULL;
