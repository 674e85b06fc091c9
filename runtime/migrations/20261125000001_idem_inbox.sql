-- idem's dedup records ("inbox"): one row per (handler, key).
-- Applied by idem::store::PgStore::migrate into the configured schema
-- (it sets search_path), or run by hand.

CREATE SEQUENCE idem_inbox_revision;

CREATE TABLE idem_inbox (
    handler      TEXT        NOT NULL,
    key          TEXT        NOT NULL,
    state        TEXT        NOT NULL CHECK (state IN ('pending', 'released', 'done', 'dead')),
    owner        UUID        NOT NULL,
    lease_until  BIGINT,                       -- ms since the epoch, while pending
    attempt      INTEGER     NOT NULL,
    fingerprint  BYTEA,
    result       BYTEA,
    created_at   BIGINT      NOT NULL,         -- ms since the epoch
    updated_at   BIGINT      NOT NULL,         -- ms since the epoch; retention counts from here
    revision     BIGINT      NOT NULL DEFAULT nextval('idem_inbox_revision'),
    PRIMARY KEY (handler, key)
);

-- Retention sweeps delete old completed rows in bounded batches.
CREATE INDEX idem_inbox_done_by_age ON idem_inbox (updated_at) WHERE state IN ('done', 'dead');
