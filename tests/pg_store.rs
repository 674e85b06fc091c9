//! The PostgreSQL dedup store beyond the conformance suite: migrations,
//! schema errors, and a table an operator can read.

use std::time::Duration;

use idem::claim::ClaimOutcome;
use idem::fingerprint::Fingerprint;
use idem::key::{HandlerName, IdempotencyKey, RecordKey};
use idem::store::{DedupStore, PgStore, StoreError};
use idem::testing::TestDatabase;
use sqlx::Row;

const WEEK: Duration = Duration::from_secs(7 * 24 * 3600);

#[tokio::test]
async fn the_inbox_is_a_table_an_operator_can_query() {
    let db = TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    // Migrating again is a no-op.
    PgStore::migrate(db.pool(), db.schema())
        .await
        .expect("migrations are idempotent");
    let store = PgStore::open(db.pool().clone(), db.schema(), WEEK)
        .await
        .expect("open");
    let key = RecordKey::new(
        &HandlerName::new("issue_card").expect("name"),
        &IdempotencyKey::new("pay/7").expect("key"),
    );
    let ClaimOutcome::Claimed(claim) = store
        .claim(&key, Some(Fingerprint::of(b"p")), Duration::from_secs(30))
        .await
        .expect("claim")
    else {
        panic!("a fresh key");
    };
    store
        .complete(&claim, Some("card-1".into()))
        .await
        .expect("complete");

    let row = sqlx::query(&format!(
        "SELECT handler, key, state, attempt, convert_from(result, 'UTF8') AS result FROM \"{}\".idem_inbox",
        db.schema()
    ))
    .fetch_one(db.pool())
    .await
    .expect("one row");
    assert_eq!(row.get::<String, _>("handler"), "issue_card");
    assert_eq!(row.get::<String, _>("key"), "k.pay=2F7");
    assert_eq!(row.get::<String, _>("state"), "done");
    assert_eq!(row.get::<i32, _>("attempt"), 1);
    assert_eq!(row.get::<String, _>("result"), "card-1");
}

#[tokio::test]
async fn a_missing_schema_or_a_bad_name_is_named() {
    let db = TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let err = PgStore::open(db.pool().clone(), "idem_never_migrated", WEEK)
        .await
        .expect_err("no table");
    assert!(matches!(err, StoreError::SchemaMissing { .. }), "{err}");
    assert!(err.to_string().contains("PgStore::migrate"), "{err}");
    for bad in ["", "Idem", "a;drop table x", "1abc", "x\"y"] {
        let err = PgStore::open(db.pool().clone(), bad, WEEK)
            .await
            .expect_err("bad name");
        assert!(
            matches!(err, StoreError::InvalidSchemaName { .. }),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test]
async fn purge_deletes_completed_rows_past_the_retention_in_batches() {
    use idem::clock::{Clock, ManualClock, SystemClock};
    let db = TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let store = PgStore::open(db.pool().clone(), db.schema(), WEEK)
        .await
        .expect("open");
    // A store whose clock reads two days ago writes rows that old.
    let two_days_ago = ManualClock::default();
    two_days_ago
        .advance(Duration::from_millis(SystemClock.now().0) - Duration::from_secs(2 * 86_400));
    let old = store.clone().on_clock(two_days_ago);
    let handler = HandlerName::new("h").expect("name");
    let complete = async |store: &PgStore, name: &str| {
        let key = RecordKey::new(&handler, &IdempotencyKey::new(name).expect("key"));
        let ClaimOutcome::Claimed(claim) = store
            .claim(&key, None, Duration::from_secs(30))
            .await
            .expect("claim")
        else {
            panic!("fresh");
        };
        store.complete(&claim, None).await.expect("complete");
    };
    for i in 0..5 {
        complete(&old, &format!("old-{i}")).await;
    }
    complete(&store, "recent").await;

    let purged = PgStore::purge(
        db.pool(),
        db.schema(),
        Some("h"),
        Duration::from_secs(86_400),
        2,
    )
    .await
    .expect("purge");
    assert_eq!(purged, 5, "five old rows, in batches of two");
    let left: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{}\".idem_inbox",
        db.schema()
    ))
    .fetch_one(db.pool())
    .await
    .expect("count");
    assert_eq!(left, 1, "the recent row stays");
}

#[tokio::test]
async fn a_role_without_privileges_gets_a_named_error() {
    let db = TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let role = format!("idem_noperm_{}", uuid::Uuid::new_v4().simple());
    sqlx::query(&format!("CREATE ROLE {role} LOGIN"))
        .execute(db.pool())
        .await
        .expect("create role");
    let base = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| idem::testing::DEFAULT_DATABASE_URL.to_owned());
    let url = url_with_user(&base, &role);
    let outcome = async {
        let pool = sqlx::PgPool::connect(&url)
            .await
            .expect("connect as the unprivileged role");
        let err = PgStore::migrate(&pool, "idem_noperm_schema")
            .await
            .expect_err("may not create a schema");
        pool.close().await;
        err
    }
    .await;
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(db.pool())
        .await
        .expect("drop role");
    assert!(
        matches!(outcome, StoreError::PermissionDenied { .. }),
        "{outcome}"
    );
    assert!(outcome.to_string().contains("GRANT"), "{outcome}");
}

/// `postgres://user@host/db` with another user.
fn url_with_user(url: &str, user: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL");
    let host = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}@{host}")
}
