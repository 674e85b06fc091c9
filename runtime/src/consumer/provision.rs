//! Start-up: streams, durable consumers, dead-letter coverage and claim
//! buckets, each checked or created before any message is fetched.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, ErrorCode, stream};
use futures::{StreamExt, TryStreamExt};

use super::RuntimeError;
use crate::handler::{HandlerConfig, StartAt};
use crate::store::{KvStore, KvStoreConfig};

/// The stream the runtime creates for dead letters under `idem.dead.>`.
pub const DEAD_LETTER_STREAM: &str = "IDEM_DEAD_LETTERS";
/// The subjects of [`DEAD_LETTER_STREAM`]: default dead-letter subjects
/// are `idem.dead.<handler>`.
pub const DEAD_LETTER_SUBJECTS: &str = "idem.dead.>";

fn js_error<'a>(
    config: &'a HandlerConfig,
    action: &'static str,
) -> impl FnOnce(async_nats::Error) -> RuntimeError + 'a {
    move |source| RuntimeError::JetStream {
        handler: config.name.clone(),
        action,
        source,
    }
}

/// The handler's stream: found, or created when allowed.
pub(super) async fn stream(
    js: &jetstream::Context,
    config: &HandlerConfig,
    create: bool,
) -> Result<stream::Stream, RuntimeError> {
    match js.get_stream(&config.stream).await {
        Ok(stream) => Ok(stream),
        Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            if !create {
                return Err(RuntimeError::StreamMissing {
                    stream: config.stream.clone(),
                    handler: config.name.clone(),
                });
            }
            let subjects = vec![
                config
                    .subject
                    .clone()
                    .unwrap_or_else(|| format!("{}.>", config.stream.to_lowercase())),
            ];
            js.create_stream(stream::Config {
                name: config.stream.clone(),
                subjects,
                ..Default::default()
            })
            .await
            .map_err(|e| js_error(config, "create the stream")(e.into()))
        }
        Err(e) => Err(js_error(config, "look up the stream")(e.into())),
    }
}

/// How long the server waits for an ack before redelivering: the lease, so
/// that an unacknowledged message and an unrenewed claim run out together.
pub(super) fn ack_wait(config: &HandlerConfig) -> Duration {
    config.lease
}

/// The handler's durable pull consumer: explicit acks, no server-side
/// `max_deliver` (the runtime decides dead letters), room for the
/// handler's concurrency.
pub(super) async fn consumer(
    stream: &stream::Stream,
    config: &HandlerConfig,
) -> Result<PullConsumer, RuntimeError> {
    let wanted = pull::Config {
        durable_name: Some(config.consumer.clone()),
        filter_subject: config.subject.clone().unwrap_or_default(),
        ack_policy: AckPolicy::Explicit,
        ack_wait: ack_wait(config),
        max_deliver: -1,
        max_ack_pending: i64::try_from(config.concurrency.saturating_mul(4).max(64))
            .unwrap_or(i64::MAX),
        deliver_policy: DeliverPolicy::All,
        ..Default::default()
    };
    match stream.get_consumer::<pull::Config>(&config.consumer).await {
        Ok(mut existing) => {
            let found = existing
                .info()
                .await
                .map_err(|e| js_error(config, "read the consumer")(e.into()))?
                .config
                .clone();
            let conflict =
                |setting, found: String, expected: String| RuntimeError::ConsumerConflict {
                    stream: config.stream.clone(),
                    consumer: config.consumer.clone(),
                    handler: config.name.clone(),
                    setting,
                    found,
                    expected,
                };
            if found.filter_subject != wanted.filter_subject {
                return Err(conflict(
                    "filter_subject",
                    found.filter_subject,
                    wanted.filter_subject,
                ));
            }
            if found.ack_policy != AckPolicy::Explicit {
                return Err(conflict(
                    "ack_policy",
                    format!("{:?}", found.ack_policy),
                    "Explicit".into(),
                ));
            }
            if found.max_deliver > 0 {
                return Err(conflict(
                    "max_deliver",
                    found.max_deliver.to_string(),
                    "unlimited (-1): a server that gives up drops messages silently".into(),
                ));
            }
            // Settings that only tune delivery follow the handler's config
            // (changed only when they differ: a worker may run without the
            // right to change consumers).
            if found.ack_wait == wanted.ack_wait && found.max_ack_pending == wanted.max_ack_pending
            {
                return Ok(existing);
            }
            stream
                .update_consumer(wanted)
                .await
                .map_err(|e| js_error(config, "update the consumer")(e.into()))
        }
        Err(_) => {
            let wanted = pull::Config {
                deliver_policy: deliver_policy(stream, config).await?,
                ..wanted
            };
            stream
                .create_consumer(wanted)
                .await
                .map_err(|e| js_error(config, "create the consumer")(e.into()))
        }
    }
}

/// Where a new consumer starts: as the handler chose, or — without a
/// choice — at the beginning of a stream that holds none of its messages
/// yet. A stream that does is refused: a renamed handler would replay it.
async fn deliver_policy(
    stream: &stream::Stream,
    config: &HandlerConfig,
) -> Result<DeliverPolicy, RuntimeError> {
    match config.start {
        Some(StartAt::All) => return Ok(DeliverPolicy::All),
        Some(StartAt::New) => return Ok(DeliverPolicy::New),
        Some(StartAt::Sequence(start_sequence)) => {
            return Ok(DeliverPolicy::ByStartSequence { start_sequence });
        }
        None => {}
    }
    let filter = config.subject.clone().unwrap_or_else(|| ">".to_owned());
    let subjects = stream
        .info_with_subjects(filter)
        .await
        .map_err(|e| js_error(config, "count the stream's messages")(e.into()))?;
    // Counted over the first subjects only: any message at all decides. A
    // page that cannot be read fails the start-up rather than count as
    // none (which would allow the replay this check exists to refuse).
    let messages: usize = subjects
        .take(1_000)
        .try_fold(0, |sum, (_, n)| async move { Ok(sum + n) })
        .await
        .map_err(|e| js_error(config, "count the stream's messages")(e.into()))?;
    if messages == 0 {
        return Ok(DeliverPolicy::All);
    }
    Err(RuntimeError::NewConsumerWouldReplay {
        handler: config.name.clone(),
        stream: config.stream.clone(),
        consumer: config.consumer.clone(),
        messages: u64::try_from(messages).unwrap_or(u64::MAX),
    })
}

/// Makes sure a stream stores the handler's dead letters; the one the
/// runtime creates has as many replicas as the claim bucket.
///
/// Asks only what a worker without admin rights may ask: whether the
/// handler's own stream, or the dead-letter stream, captures the subject
/// (stream info); only for a subject neither does, which stream captures it
/// (`$JS.API.STREAM.NAMES`).
pub(super) async fn dead_letters(
    js: &jetstream::Context,
    stream: &stream::Stream,
    config: &HandlerConfig,
    replicas: usize,
) -> Result<(), RuntimeError> {
    let dead = &config.dead_letter;
    let captures = |found: &stream::Config| {
        found
            .subjects
            .iter()
            .any(|f| crate::subject::matches(f, dead))
    };
    if captures(&stream.cached_info().config) {
        return Ok(());
    }
    let ours = dead.starts_with("idem.dead.");
    if ours {
        match js.get_stream(DEAD_LETTER_STREAM).await {
            Ok(found) if captures(&found.cached_info().config) => return Ok(()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), GetStreamErrorKind::JetStream(ref j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
                {}
            Err(e) => return Err(js_error(config, "look up the dead-letter stream")(e.into())),
        }
    }
    match js.stream_by_subject(dead.clone()).await {
        Ok(_) => return Ok(()),
        Err(e)
            if e.kind() == async_nats::jetstream::context::GetStreamByNameErrorKind::NotFound => {}
        Err(e) => {
            return Err(js_error(
                config,
                "find the stream of the dead-letter subject",
            )(e.into()));
        }
    }
    if !ours {
        return Err(RuntimeError::DeadLetterUncovered {
            subject: dead.clone(),
            handler: config.name.clone(),
        });
    }
    js.get_or_create_stream(stream::Config {
        name: DEAD_LETTER_STREAM.into(),
        subjects: vec![DEAD_LETTER_SUBJECTS.into()],
        description: Some(
            "messages idem could not process, with the reason in Idem-* headers".into(),
        ),
        // As safe as the claims that point at them.
        num_replicas: replicas,
        ..Default::default()
    })
    .await
    .map(drop)
    .map_err(|e| js_error(config, "create the dead-letter stream")(e.into()))
}

/// The claim bucket for the handler's retention: `idem_claims` at the
/// default 7 days, `idem_claims_<seconds>s` otherwise (a bucket has one
/// `max_age`).
pub(super) async fn claims(
    js: &jetstream::Context,
    base: &KvStoreConfig,
    config: &HandlerConfig,
) -> Result<KvStore, RuntimeError> {
    let bucket = if config.retention == KvStoreConfig::default().retention_period() {
        base.bucket_name().to_owned()
    } else {
        format!("{}_{}s", base.bucket_name(), config.retention.as_secs())
    };
    let kv = base.clone().bucket(&bucket).retention(config.retention);
    let store_error = |source| RuntimeError::Store {
        handler: config.name.clone(),
        source,
    };
    let store = KvStore::open(js, kv).await.map_err(store_error)?;
    super::name_registry::register(&store, &bucket, config).await?;
    Ok(store)
}
