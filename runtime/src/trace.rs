//! W3C trace context across the broker (feature `opentelemetry`): the
//! producer's span travels in `traceparent` / `tracestate` headers, and the
//! handler's span (`idem.message`, `idem.request`) continues its trace.
//!
//! Injected where a message is *made* — [`Publisher::send`](crate::Publisher::send),
//! `Outbox::enqueue`, `PgOutbox::enqueue` — from the current
//! `tracing` span's OpenTelemetry context (tracing-opentelemetry), so a
//! message relayed later from an outbox still carries the trace of the code
//! that wrote it. A message that already carries a `traceparent`, or that
//! is made outside any traced span, is left as it is. Without the feature
//! both steps do nothing.

use async_nats::HeaderMap;
use tracing::Span;

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = "traceparent";

/// Adds the current span's trace context to `headers`, unless they carry
/// one already or there is none.
#[cfg(feature = "opentelemetry")]
pub(crate) fn inject(headers: &mut HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if headers.get(TRACEPARENT).is_some() {
        return;
    }
    let context = Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&context, &mut Injector(headers));
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn inject(_: &mut HeaderMap) {}

/// Makes `span` a child of the trace context `headers` carry, if any.
#[cfg(feature = "opentelemetry")]
pub(crate) fn continue_in(span: &Span, headers: &HeaderMap) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let parent =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Extractor(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

#[cfg(not(feature = "opentelemetry"))]
pub(crate) fn continue_in(_: &Span, _: &HeaderMap) {}

#[cfg(feature = "opentelemetry")]
struct Injector<'a>(&'a mut HeaderMap);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Injector for Injector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

#[cfg(feature = "opentelemetry")]
struct Extractor<'a>(&'a HeaderMap);

#[cfg(feature = "opentelemetry")]
impl opentelemetry::propagation::Extractor for Extractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(name, _)| name.as_ref()).collect()
    }
}
