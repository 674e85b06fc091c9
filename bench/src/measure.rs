//! Figures of one run (rate, latency percentiles), the median of several
//! runs, and the latency probe that times idem's per-message span.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tracing::subscriber::Interest;
use tracing::{Metadata, span};
use tracing_subscriber::Layer;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

/// What one run measured.
#[derive(Clone, Copy, Debug)]
pub struct Figures {
    /// Messages per second over the whole run.
    pub rate: f64,
    /// Per-message latency percentiles, where the scenario has them.
    pub p50: Option<Duration>,
    pub p99: Option<Duration>,
}

impl Figures {
    pub fn new(messages: usize, took: Duration, latencies: &mut [Duration]) -> Self {
        Self {
            rate: messages as f64 / took.as_secs_f64().max(1e-9),
            p50: percentile(latencies, 0.50),
            p99: percentile(latencies, 0.99),
        }
    }

    /// The median of each figure over several runs.
    pub fn median(runs: &[Figures]) -> Figures {
        let mut rates: Vec<f64> = runs.iter().map(|f| f.rate).collect();
        rates.sort_by(f64::total_cmp);
        let mut p50: Vec<Duration> = runs.iter().filter_map(|f| f.p50).collect();
        let mut p99: Vec<Duration> = runs.iter().filter_map(|f| f.p99).collect();
        Figures {
            rate: rates.get(rates.len() / 2).copied().unwrap_or(0.0),
            p50: percentile(&mut p50, 0.5),
            p99: percentile(&mut p99, 0.5),
        }
    }
}

/// A duration in microseconds, as the reports print them.
pub fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// The `q` quantile (nearest rank) of `samples`; `None` if there are none.
pub fn percentile(samples: &mut [Duration], q: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len());
    Some(samples[rank - 1])
}

/// Per-message latencies, collected from many tasks.
#[derive(Clone, Default)]
pub struct Latencies(Arc<Mutex<Vec<Duration>>>);

impl Latencies {
    pub fn record(&self, took: Duration) {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(took);
    }

    /// Everything recorded so far; the collector starts empty again.
    pub fn take(&self) -> Vec<Duration> {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

/// The span the runtime opens around each delivery: from the moment a
/// message has its permit until it is acknowledged (or NAKed). The raw
/// scenarios open one of the same name around the same work, so that every
/// scenario is timed by the same code at the same cost.
pub const MESSAGE_SPAN: &str = "idem.message";

/// A tracing layer that times every [`MESSAGE_SPAN`] from creation to close.
/// It enables nothing else (a global filter: the runtime's and sqlx's other
/// instrumentation stays off, as in production without a subscriber).
pub struct SpanTimer {
    latencies: Latencies,
}

impl SpanTimer {
    pub fn new(latencies: Latencies) -> Self {
        Self { latencies }
    }
}

struct Opened(Instant);

impl<S> Layer<S> for SpanTimer
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, meta: &'static Metadata<'static>) -> Interest {
        if meta.name() == MESSAGE_SPAN {
            Interest::always()
        } else {
            Interest::never()
        }
    }

    fn enabled(&self, meta: &Metadata<'_>, _: Context<'_, S>) -> bool {
        meta.name() == MESSAGE_SPAN
    }

    fn on_new_span(&self, _: &span::Attributes<'_>, id: &span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Opened(Instant::now()));
        }
    }

    fn on_close(&self, id: span::Id, ctx: Context<'_, S>) {
        if let Some(span) = ctx.span(&id)
            && let Some(Opened(at)) = span.extensions().get::<Opened>()
        {
            self.latencies.record(at.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(
            percentile(&mut samples, 0.5),
            Some(Duration::from_millis(50))
        );
        assert_eq!(
            percentile(&mut samples, 0.99),
            Some(Duration::from_millis(99))
        );
        assert_eq!(percentile(&mut [], 0.5), None);
    }

    #[test]
    fn the_median_run_is_reported() {
        let run = |rate, ms| Figures {
            rate,
            p50: Some(Duration::from_millis(ms)),
            p99: None,
        };
        let median = Figures::median(&[run(3.0, 9), run(1.0, 1), run(2.0, 5)]);
        assert_eq!(median.rate, 2.0);
        assert_eq!(median.p50, Some(Duration::from_millis(5)));
        assert_eq!(median.p99, None);
    }
}
