//! Idempotent request/reply against a real server: a handler served as a
//! NATS micro service endpoint runs once per key, and every request for the
//! key — retried after a lost reply, or arriving while the first runs — gets
//! the first's answer.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use idem::consumer::Outcome;
use idem::publisher::{RequestError, Requester};
use idem::reply::ReplyErrorKind;
use idem::testing::{NatsServer, TestDatabase};
use idem::{HandlerError, Json, Retry, Runtime, State, Tx, idempotent};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(Debug, Serialize, Deserialize)]
struct Charge {
    charge_id: String,
    cents: u64,
    /// How long the handler takes.
    #[serde(default)]
    slow_ms: u64,
    /// Fail the first n runs (retryable); `u32::MAX`: permanently.
    #[serde(default)]
    fail: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Receipt {
    charge_id: String,
    /// New on every run: identical receipts prove one run.
    receipt: String,
}

/// The test's PostgreSQL schema.
#[derive(Clone)]
struct Schema(String);

/// How many times each handler's effect ran.
#[derive(Clone, Default)]
struct Runs(Arc<AtomicU32>);

impl Runs {
    fn count(&self) -> u32 {
        self.0.load(Ordering::SeqCst)
    }
}

#[idempotent(service = "payments", subject = "payments.charge", key = charge.charge_id, lease = "5s")]
async fn charge_card(
    Json(charge): Json<Charge>,
    State(runs): State<Runs>,
) -> Result<Receipt, HandlerError> {
    let run = runs.0.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(charge.slow_ms)).await;
    if charge.fail == u32::MAX {
        return Err(HandlerError::permanent("card declined"));
    }
    if run <= charge.fail {
        return Err(HandlerError::retryable(format!(
            "gateway timeout (run {run})"
        )));
    }
    Ok(Receipt {
        charge_id: charge.charge_id,
        receipt: uuid::Uuid::now_v7().to_string(),
    })
}

struct Served {
    server: NatsServer,
    client: async_nats::Client,
    runs: Runs,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), idem::consumer::RuntimeError>>,
    stats: idem::consumer::Stats,
}

impl Served {
    async fn start(
        configure: impl FnOnce(idem::consumer::RuntimeBuilder) -> idem::consumer::RuntimeBuilder,
    ) -> Self {
        let server = NatsServer::start().await.expect("nats-server");
        let client = server.connect().await.expect("connect");
        let runs = Runs::default();
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = configure(Runtime::builder(client.clone()).state(runs.clone()))
            .shutdown_on(async move {
                let _ = stopped.await;
            })
            .build()
            .await
            .expect("runtime");
        let stats = runtime.stats();
        let task = tokio::spawn(runtime.run());
        Self {
            server,
            client,
            runs,
            stop,
            task,
            stats,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("task").expect("runtime");
    }

    fn requester(&self) -> Requester {
        Requester::new(self.client.clone())
            .timeout(Duration::from_secs(10))
            .retry(Retry::fixed("100ms").attempts(5))
    }
}

fn charge_of(id: &str, slow_ms: u64, fail: u32) -> Charge {
    Charge {
        charge_id: id.into(),
        cents: 500,
        slow_ms,
        fail,
    }
}

/// Sends a request whose reply nobody waits for: the client gives up at
/// `timeout`, and the reply, when it comes, is lost.
async fn request_and_lose_the_reply(client: &async_nats::Client, subject: &str, body: &Charge) {
    let request = async_nats::Request::new()
        .payload(serde_json::to_vec(body).expect("json").into())
        .timeout(Some(Duration::from_millis(200)));
    let lost = client.send_request(subject.to_owned(), request).await;
    assert!(
        matches!(&lost, Err(e) if e.kind() == async_nats::RequestErrorKind::TimedOut),
        "the first request should time out while the handler runs: {lost:?}"
    );
}

#[tokio::test]
async fn a_request_retried_after_its_reply_was_lost_runs_once_and_gets_the_same_answer() {
    let served = Served::start(|b| b.handler(charge_card)).await;
    let slow = charge_of("ch-1", 1_000, 0);
    request_and_lose_the_reply(&served.client, "payments.charge", &slow).await;
    // The retry arrives while the first request still runs: it waits.
    let requester = served.requester();
    let first: Receipt = requester
        .request_json("payments.charge", &slow)
        .await
        .expect("an answer");
    // And one long after: answered from the record.
    let again: Receipt = requester
        .request_json("payments.charge", &slow)
        .await
        .expect("an answer");
    assert_eq!(served.runs.count(), 1, "one execution for the key");
    assert_eq!(
        first, again,
        "every request for the key gets the first's answer"
    );
    assert_eq!(first.charge_id, "ch-1");
    assert!(served.stats.handler("charge_card").get(Outcome::Duplicate) >= 2);
    served.stop().await;
}

#[tokio::test]
async fn the_same_key_with_another_request_is_answered_key_conflict() {
    let served = Served::start(|b| b.handler(charge_card)).await;
    let requester = served.requester();
    let _: Receipt = requester
        .request_json("payments.charge", &charge_of("ch-2", 0, 0))
        .await
        .expect("an answer");
    let mut other = charge_of("ch-2", 0, 0);
    other.cents = 9_999;
    let refused = requester
        .request_json::<_, Receipt>("payments.charge", &other)
        .await
        .expect_err("another request under the key");
    assert_eq!(
        refused.kind(),
        Some(ReplyErrorKind::KeyConflict),
        "{refused}"
    );
    assert!(refused.to_string().contains("another request"), "{refused}");
    assert_eq!(served.runs.count(), 1);
    served.stop().await;
}

#[tokio::test]
async fn a_failure_is_replied_with_its_kind_and_asking_again_runs_it_again() {
    let served = Served::start(|b| b.handler(charge_card)).await;
    // Fails once (retryable): the requester asks again, and the second run
    // answers.
    let requester = served.requester();
    let flaky = charge_of("ch-3", 0, 1);
    let receipt: Receipt = requester
        .request_json("payments.charge", &flaky)
        .await
        .expect("the second run answers");
    assert_eq!(receipt.charge_id, "ch-3");
    assert_eq!(served.runs.count(), 2);
    // A permanent failure is answered at once, with its kind.
    let declined = requester
        .request_json::<_, Receipt>("payments.charge", &charge_of("ch-4", 0, u32::MAX))
        .await
        .expect_err("declined");
    match &declined {
        RequestError::Refused {
            kind,
            code,
            message,
            ..
        } => {
            assert_eq!(*kind, ReplyErrorKind::Rejected);
            assert_eq!(*code, 422);
            assert!(message.contains("card declined"), "{message}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
    assert_eq!(served.runs.count(), 3, "a refusal is not asked again");
    // An undecodable request is a bad request, not a failure.
    let garbage = requester
        .request("payments.charge", "not json")
        .await
        .expect_err("garbage");
    assert_eq!(
        garbage.kind(),
        Some(ReplyErrorKind::BadRequest),
        "{garbage}"
    );
    served.stop().await;
}

#[tokio::test]
async fn the_endpoint_is_a_nats_micro_service() {
    let served = Served::start(|b| b.handler(charge_card)).await;
    let info = served
        .client
        .request("$SRV.INFO.payments", "".into())
        .await
        .expect("$SRV.INFO answers");
    let info: serde_json::Value = serde_json::from_slice(&info.payload).expect("json");
    assert_eq!(info["name"], "payments");
    assert_eq!(info["endpoints"][0]["name"], "charge_card");
    assert_eq!(info["endpoints"][0]["subject"], "payments.charge");
    let _ = &served.server;
    served.stop().await;
}

#[idempotent(
    service = "ledger",
    subject = "ledger.transfer",
    key = charge.charge_id,
    dedup = transactional,
    lease = "5s"
)]
async fn transfer(
    Json(charge): Json<Charge>,
    State(Schema(schema)): State<Schema>,
    tx: Tx,
) -> Result<Receipt, HandlerError> {
    tokio::time::sleep(Duration::from_millis(charge.slow_ms)).await;
    let mut conn = tx.conn().await?;
    sqlx::query(&format!(
        "INSERT INTO \"{schema}\".transfers (id, cents) VALUES ($1, $2)"
    ))
    .bind(&charge.charge_id)
    .bind(i64::try_from(charge.cents).unwrap_or(i64::MAX))
    .execute(&mut *conn)
    .await?;
    Ok(Receipt {
        charge_id: charge.charge_id,
        receipt: uuid::Uuid::now_v7().to_string(),
    })
}

#[tokio::test]
async fn a_transactional_request_retried_after_its_reply_was_lost_commits_once() {
    let db = TestDatabase::create()
        .await
        .expect("a PostgreSQL schema (DATABASE_URL)");
    let schema = db.schema().to_owned();
    sqlx::query(&format!(
        "CREATE TABLE \"{schema}\".transfers (id TEXT NOT NULL, cents BIGINT NOT NULL)"
    ))
    .execute(db.pool())
    .await
    .expect("table");
    let pool = db.pool().clone();
    let served = Served::start(|b| {
        b.postgres(pool, &schema)
            .state(Schema(schema.clone()))
            .handler(transfer)
    })
    .await;
    let slow = charge_of("tr-1", 1_000, 0);
    request_and_lose_the_reply(&served.client, "ledger.transfer", &slow).await;
    let requester = served.requester();
    let first: Receipt = requester
        .request_json("ledger.transfer", &slow)
        .await
        .expect("an answer");
    let again: Receipt = requester
        .request_json("ledger.transfer", &slow)
        .await
        .expect("an answer");
    assert_eq!(first, again);
    let rows: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM \"{schema}\".transfers WHERE id = 'tr-1'"
    ))
    .fetch_one(db.pool())
    .await
    .expect("count");
    assert_eq!(rows, 1, "one commit for the key");
    served.stop().await;
}

fn charge_key(id: &str) -> idem::key::RecordKey {
    idem::key::RecordKey::new(
        &idem::key::HandlerName::new("charge_card").expect("name"),
        &idem::key::IdempotencyKey::new(id).expect("key"),
    )
}

#[tokio::test]
async fn a_service_taking_over_an_expired_claim_counts_the_takeover() {
    use idem::store::DedupStore;
    let served = Served::start(|b| b.handler(charge_card)).await;
    // A worker that died while it held the key (a 1 s lease).
    let js = async_nats::jetstream::new(served.client.clone());
    let claims = idem::store::KvStore::open(&js, idem::store::KvStoreConfig::default())
        .await
        .expect("bucket");
    let dead_worker = claims.as_owner(idem::claim::Owner::random());
    let held = dead_worker
        .claim(&charge_key("ch-t"), None, Duration::from_secs(1))
        .await
        .expect("claim");
    assert!(
        matches!(held, idem::claim::ClaimOutcome::Claimed(_)),
        "{held:?}"
    );
    // The request waits out the lease, takes the key over and runs.
    let receipt: Receipt = served
        .requester()
        .request_json("payments.charge", &charge_of("ch-t", 0, 0))
        .await
        .expect("an answer");
    assert_eq!(receipt.charge_id, "ch-t");
    assert_eq!(served.runs.count(), 1);
    assert_eq!(
        served.stats.handler("charge_card").get(Outcome::Reclaimed),
        1,
        "every takeover is counted"
    );
    served.stop().await;
}

#[tokio::test]
async fn a_run_whose_claim_was_lost_before_completion_does_not_reply_its_own_body() {
    use idem::store::DedupStore;
    let served = Served::start(|b| b.handler(charge_card)).await;
    let js = async_nats::jetstream::new(served.client.clone());
    let claims = idem::store::KvStore::open(&js, idem::store::KvStoreConfig::default())
        .await
        .expect("bucket");
    let client = served.client.clone();
    let asked = tokio::spawn(async move {
        let body = serde_json::to_vec(&charge_of("ch-l", 1_500, 0)).expect("json");
        client
            .send_request(
                "payments.charge".to_owned(),
                async_nats::Request::new()
                    .payload(body.into())
                    .timeout(Some(Duration::from_secs(10))),
            )
            .await
    });
    // While the handler runs, its claim goes (an operator forces a forget).
    let key = charge_key("ch-l");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the claim was never seen"
        );
        if let Some(held) = claims.inspect(&key).await.expect("read")
            && claims.forget(&key, held.revision).await.expect("forget")
                == idem::claim::operator::Written::Applied
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let answer = asked.await.expect("task").expect("a reply");
    let kind = answer
        .headers
        .as_ref()
        .and_then(|h| h.get(idem::reply::KIND_HEADER))
        .and_then(|k| ReplyErrorKind::parse(k.as_str()));
    assert_eq!(
        kind,
        Some(ReplyErrorKind::OutcomeUnknown),
        "replied its own body although the key is not its: {:?}",
        String::from_utf8_lossy(&answer.payload)
    );
    assert_eq!(
        served.stats.handler("charge_card").get(Outcome::LeaseLost),
        1
    );
    served.stop().await;
}

/// `charge_card` of another service: the same handler name.
#[idempotent(
    name = "charge_card",
    service = "refunds",
    subject = "refunds.charge",
    key = charge.charge_id,
    lease = "5s"
)]
async fn refund_charge(
    Json(charge): Json<Charge>,
    State(runs): State<Runs>,
) -> Result<Receipt, HandlerError> {
    runs.0.fetch_add(1, Ordering::SeqCst);
    Ok(Receipt {
        charge_id: charge.charge_id,
        receipt: "refund".into(),
    })
}

#[tokio::test]
async fn two_services_with_a_handler_of_one_name_in_one_bucket_are_refused_at_start() {
    let served = Served::start(|b| b.handler(charge_card)).await;
    let refused = Runtime::builder(served.client.clone())
        .state(Runs::default())
        .handler(refund_charge)
        .build()
        .await
        .err()
        .expect("the refunds service must not share the payments service's records");
    assert!(
        matches!(
            &refused,
            idem::consumer::RuntimeError::HandlerNameTaken {
                registered: idem::consumer::Registered::Service { service, .. },
                ..
            } if service == "payments"
        ),
        "{refused}"
    );
    served.stop().await;
}

/// A service handler whose records live 2 s (a bucket of its own).
#[idempotent(
    service = "ephemeral",
    subject = "ephemeral.ping",
    key = charge.charge_id,
    lease = "500ms",
    retention = "2s"
)]
async fn short_lived(Json(charge): Json<Charge>) -> Result<Receipt, HandlerError> {
    Ok(Receipt {
        charge_id: charge.charge_id,
        receipt: "pong".into(),
    })
}

#[tokio::test]
async fn a_running_handlers_registration_outlives_the_buckets_retention() {
    let served = Served::start(|b| b.handler(short_lived)).await;
    let js = async_nats::jetstream::new(served.client.clone());
    let bucket = idem::store::KvStore::open_existing(&js, "idem_claims_2s")
        .await
        .expect("read")
        .expect("the handler's bucket");
    // Three retentions later the registration is still there: the running
    // handler rewrote it.
    tokio::time::sleep(Duration::from_secs(6)).await;
    use idem::store::RevisionedMap;
    let registration = bucket
        .map()
        .read("idem=handlers.short_lived")
        .await
        .expect("read");
    assert!(
        registration.is_some(),
        "the registration expired while its handler ran"
    );
    served.stop().await;
}
