-- What each transactional handler registered at start-up: how long it keeps
-- its keys. The operator's tools read it, so that `idem inbox purge` never
-- deletes a key younger than its handler's retention (a redelivery would
-- then run its effect again).

CREATE TABLE idem_handlers (
    handler       TEXT    PRIMARY KEY,
    retention_ms  BIGINT  NOT NULL,
    updated_at    BIGINT  NOT NULL          -- ms since the epoch
);
