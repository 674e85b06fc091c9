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
