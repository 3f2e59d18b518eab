-- The consumer's side of the shop database: what it believes it charged.
-- A sqlx migration, applied once per database (`consumer::migrate`).
-- The PSP's ledger, not this table, is the ground truth for money moved.
CREATE TABLE IF NOT EXISTS payments (
    payment_id    bigserial PRIMARY KEY,
    order_id      uuid NOT NULL,
    event_id      uuid NOT NULL,
    psp_charge_id text NOT NULL,
    amount_cents  bigint NOT NULL,
    currency      text NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now()
);

-- The hardened consumer's dedup table (chapter 2): one row per event it has
-- processed, inserted FIRST, in the same transaction as the payment. The
-- named primary key is what turns a duplicate delivery into a unique
-- violation, mapped to a domain outcome by name, never by message text.
-- ANCHOR: processed_messages
CREATE TABLE IF NOT EXISTS processed_messages (
    event_id      uuid NOT NULL,
    order_id      uuid NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    -- sha256 of (order_id, amount_cents, currency): what was charged. A
    -- dedup hit with another fingerprint is a producer bug, not a redelivery.
    fingerprint   bytea,
    -- The business identity: set by the hardened consumer, which charges
    -- each order once whatever event ids it arrives under (chapter 3).
    charged_order uuid,
    CONSTRAINT processed_messages_event_id_key PRIMARY KEY (event_id)
);
-- ANCHOR_END: processed_messages
-- Databases made before fingerprints and order claims (created by an
-- earlier version of this file) upgrade in place; their old rows keep NULLs
-- (no fingerprint to compare, no order claimed).
ALTER TABLE processed_messages ADD COLUMN IF NOT EXISTS fingerprint bytea;
ALTER TABLE processed_messages ADD COLUMN IF NOT EXISTS charged_order uuid;
-- One order, one payment. NULLs never collide, so the message-keyed
-- variants, which leave it NULL, are not guarded per order.
CREATE UNIQUE INDEX IF NOT EXISTS processed_messages_charged_order_key
    ON processed_messages (charged_order);
-- Retention deletes by age; without this index every cleanup is a full scan.
CREATE INDEX IF NOT EXISTS processed_messages_processed_at_idx
    ON processed_messages (processed_at);
