-- The shop's side of the shop database. An order row is the promise to the
-- customer: every committed order must be charged exactly once.
CREATE TABLE IF NOT EXISTS orders (
    order_id     uuid PRIMARY KEY,
    amount_cents bigint NOT NULL CHECK (amount_cents > 0),
    currency     text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now()
);
