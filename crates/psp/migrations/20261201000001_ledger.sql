-- The PSP's own database: another company's system, never shared with the shop.
-- A sqlx migration: it runs once per database, inside the migrator's own
-- transaction. `IF NOT EXISTS` lets it adopt a database whose tables were
-- created before the book used migrations.

-- "relation already exists, skipping" on such a database is noise, not news.
SET LOCAL client_min_messages = warning;

-- The ledger: one row per executed charge, that is, one per money movement.
-- The book's audit counts these rows and nothing else.
CREATE TABLE IF NOT EXISTS charges (
    id              text        PRIMARY KEY,
    order_id        text        NOT NULL,
    amount_cents    bigint      NOT NULL CHECK (amount_cents > 0),
    currency        text        NOT NULL,
    -- NULL when the caller sent no Idempotency-Key: such a call always charges.
    idempotency_key text        NULL,
    created_at      timestamptz NOT NULL DEFAULT now()
);

-- The audit groups by order; the GET endpoint filters by it.
CREATE INDEX IF NOT EXISTS charges_order_id_idx ON charges (order_id);

-- One row per (caller, key): the claim while the first request runs, then the
-- stored response that every retry within the window gets replayed.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    -- Keys are scoped per caller, as at Stripe: two merchants may pick the same key.
    api_key         text        NOT NULL,
    key             text        NOT NULL,
    -- sha256 of the request parameters: the same key with other parameters is a
    -- client bug (422), never a replay.
    fingerprint     text        NOT NULL,
    state           text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
    -- Stored only once state = 'completed', in the same transaction as the charge.
    -- The body is kept as text so that a replay is byte-for-byte the first response.
    response_status integer     NULL,
    response_body   text        NULL,
    -- Starts the retention window; a key older than the window counts as new.
    created_at      timestamptz NOT NULL DEFAULT now(),
    -- When the current claim was taken; NULL once completed. A claim older than
    -- the in-flight timeout belongs to a request that died, and may be taken over.
    locked_at       timestamptz NULL,
    -- Fences the claim holder: the charge commits only while this token is still
    -- the one it claimed with, so a holder whose claim was taken over cannot
    -- charge a second time.
    claim_token     uuid        NOT NULL,
    PRIMARY KEY (api_key, key),
    CHECK ((state = 'completed') = (response_status IS NOT NULL AND response_body IS NOT NULL))
);

