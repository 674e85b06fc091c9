//! The dedup-store conformance suite (`idem::testing::conformance`) against
//! every store: in memory, and on JetStream KV on a real server (the suite
//! script runs this file on nats-server 2.9 and on the current release) —
//! one bucket, and one spread over three shards — and on PostgreSQL (a schema per test on `DATABASE_URL`). The
//! R3 cluster run is in `kv_store.rs`.

mod memory {
    idem::conformance_tests!(async { idem::testing::conformance::MemoryFixture::new() });
}

mod kv {
    idem::conformance_tests!(async {
        idem::testing::conformance::KvFixture::start()
            .await
            .expect("a nats-server with a KV bucket")
    });
}

mod kv_sharded {
    idem::conformance_tests!(async {
        idem::testing::conformance::KvFixture::start_sharded(3)
            .await
            .expect("a nats-server with a bucket of 3 shards")
    });
}

mod pg {
    idem::conformance_tests!(async {
        idem::testing::conformance::PgFixture::start()
            .await
            .expect("a PostgreSQL schema (DATABASE_URL)")
    });
}

/// An inbox row in a state this version does not know is an error naming
/// it — never read as some state it might not be.
#[tokio::test]
async fn an_inbox_row_in_an_unknown_state_is_refused_naming_it() {
    use idem::store::{DedupStore, PgStore};
    let db = idem::testing::TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let s = db.schema();
    for statement in [
        format!("ALTER TABLE \"{s}\".idem_inbox DROP CONSTRAINT idem_inbox_state_check"),
        format!(
            "INSERT INTO \"{s}\".idem_inbox (handler, key, state, owner, attempt, created_at, updated_at) \
             VALUES ('ship', 'k.o-1', 'archived', gen_random_uuid(), 1, 0, 9999999999999)"
        ),
    ] {
        sqlx::query(&statement)
            .execute(db.pool())
            .await
            .expect("set up");
    }
    let inbox = PgStore::open(db.pool().clone(), s, std::time::Duration::from_secs(3600))
        .await
        .expect("inbox");
    let key = idem::key::RecordKey::new(
        &idem::key::HandlerName::new("ship").expect("name"),
        &idem::key::IdempotencyKey::new("o-1").expect("key"),
    );
    let read = inbox.inspect(&key).await;
    let error = read.expect_err("an unknown state must not read as a record");
    assert!(format!("{error:?}").contains("archived"), "{error:?}");
}
