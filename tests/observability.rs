//! What users observe: one trace from the producer's span to the handler's
//! (W3C `traceparent` in the message headers, feature `opentelemetry`), and
//! latency histograms through the `metrics` facade (feature `metrics`).

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use idem::consumer::{Latency, Outcome, Stats};
use idem::outbox::{Outbox, OutboxConfig};
use idem::publisher::{Outgoing, Publisher};
use idem::testing::NatsServer;
use idem::{HandlerError, Json, Runtime, idempotent};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tokio::time::{Instant, sleep};
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[idempotent(stream = "ORDERS", subject = "orders.placed", key = id)]
async fn confirm_order(Json(id): Json<u64>) -> Result<(), HandlerError> {
    tracing::info!(id, "confirmed");
    Ok(())
}

/// A runtime running `confirm_order` on a fresh ORDERS stream: the client,
/// the runtime's stats, its task.
async fn confirming(
    server: &NatsServer,
) -> (
    async_nats::Client,
    Stats,
    tokio::task::JoinHandle<Result<(), idem::consumer::RuntimeError>>,
) {
    let client = orders_stream(server).await;
    let runtime = Runtime::builder(client.clone())
        .handler(confirm_order)
        .shutdown_on(std::future::pending())
        .build()
        .await
        .expect("runtime");
    let stats = runtime.stats();
    (client, stats, tokio::spawn(runtime.run()))
}

async fn orders_stream(server: &NatsServer) -> async_nats::Client {
    let client = server.connect().await.expect("connect");
    jetstream::new(client.clone())
        .create_stream(stream::Config {
            name: "ORDERS".into(),
            subjects: vec!["orders.>".into()],
            ..Default::default()
        })
        .await
        .expect("stream");
    client
}

async fn processed(stats: &Stats, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.handler("confirm_order").get(Outcome::Processed) < n {
        assert!(
            Instant::now() < deadline,
            "{n} messages not processed within 30 s"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> Vec<&'a SpanData> {
    spans.iter().filter(|s| s.name == name).collect()
}

// One thread, so that the subscriber set for the test sees the runtime's
// tasks too.
#[tokio::test(flavor = "current_thread")]
async fn one_trace_spans_the_producer_and_the_handler_through_publisher_and_outbox() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("idem-test")));
    let _default = tracing::subscriber::set_default(subscriber);

    let server = NatsServer::start().await.expect("nats-server");
    let (client, stats, running) = confirming(&server).await;

    // Published directly, inside the producer's span.
    let publisher = Publisher::new(client.clone());
    async {
        publisher
            .send(Outgoing::new("orders.placed", "1"))
            .await
            .expect("published");
    }
    .instrument(tracing::info_span!("checkout"))
    .await;
    // Written to an outbox inside another span, relayed later by the
    // outbox's own task: the trace is the writer's.
    let dir = tempfile::tempdir().expect("tempdir");
    let outbox = Outbox::open(
        dir.path().join("outbox"),
        publisher.clone(),
        OutboxConfig::default(),
    )
    .await
    .expect("outbox");
    async {
        outbox
            .enqueue(Outgoing::new("orders.placed", "2"))
            .await
            .expect("enqueued");
    }
    .instrument(tracing::info_span!("refund"))
    .await;
    processed(&stats, 2).await;
    running.abort();
    let _ = provider.force_flush();

    let spans = exporter.get_finished_spans().expect("spans");
    let handled = named(&spans, "idem.message");
    assert_eq!(handled.len(), 2, "one handler span per message: {spans:#?}");
    for producer in ["checkout", "refund"] {
        let producer = named(&spans, producer);
        assert_eq!(producer.len(), 1);
        let producer = producer[0];
        let child = handled
            .iter()
            .find(|h| h.span_context.trace_id() == producer.span_context.trace_id())
            .unwrap_or_else(|| {
                panic!(
                    "no handler span in the trace of {}: {spans:#?}",
                    producer.name
                )
            });
        assert_eq!(child.parent_span_id, producer.span_context.span_id());
        assert!(child.parent_span_is_remote, "the parent came over the wire");
    }
}

#[tokio::test]
async fn each_step_s_latency_is_a_histogram_per_handler() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder
        .install()
        .expect("the only recorder of this test process");

    let server = NatsServer::start().await.expect("nats-server");
    let (client, stats, running) = confirming(&server).await;
    let publisher = Publisher::new(client);
    for id in 1..=3 {
        publisher
            .send(Outgoing::new("orders.placed", id.to_string()))
            .await
            .expect("published");
    }
    processed(&stats, 3).await;
    running.abort();

    let snapshot = snapshotter.snapshot().into_vec();
    for latency in Latency::ALL {
        let samples: Vec<f64> = snapshot
            .iter()
            .filter(|(key, ..)| {
                key.key().name() == latency.metric()
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "handler" && l.value() == "confirm_order")
            })
            .flat_map(|(.., value)| match value {
                metrics_util::debugging::DebugValue::Histogram(values) => {
                    values.iter().map(|v| v.into_inner()).collect()
                }
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(samples.len(), 3, "{}: {samples:?}", latency.metric());
        assert!(
            samples.iter().all(|s| (0.0..30.0).contains(s)),
            "{}: {samples:?}",
            latency.metric()
        );
    }
}
