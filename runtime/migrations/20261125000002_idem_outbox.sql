-- idem's transactional outbox: messages written in the business
-- transaction, published by a relay with `id` as their Nats-Msg-Id.

CREATE TABLE idem_outbox (
    id           TEXT        PRIMARY KEY,      -- the Nats-Msg-Id
    subject      TEXT        NOT NULL,
    payload      BYTEA       NOT NULL,
    headers      TEXT        NOT NULL DEFAULT '[]',   -- JSON: [["name", "value"], ...]
    seq          BIGSERIAL   NOT NULL,         -- publish order
    enqueued_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    failed_at    TIMESTAMPTZ,                  -- set when the broker refused it for good
    error        TEXT
);

CREATE INDEX idem_outbox_pending ON idem_outbox (seq) WHERE failed_at IS NULL;
