-- The consumer's side of the shop database: what it believes it charged.
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
