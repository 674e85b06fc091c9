//! One run: deploy, publish the workload while the schedule's faults hit,
//! heal, drain, let the operator act (fix, replay, forget, resend), drain
//! again, stop the workers, gather the evidence and check it.

use std::time::Duration;

use futures::StreamExt;
use idem::Publisher;
use idem::publisher::Outgoing;
use tokio::time::{Instant, sleep, sleep_until};

use crate::check::{Publishing, Verdict, check};
use crate::cli::Settings;
use crate::deploy::{Deployment, Fallible};
use crate::evidence::{Evidence, gather};
use crate::operator::{Operations, act};
use crate::schedule::{Fault, schedule};
use crate::workload::Workload;

/// Sends in flight at once.
const PUBLISH_WINDOW: usize = 128;

/// What a run did and found.
pub struct Outcome {
    /// What was asked.
    pub settings: Settings,
    /// The messages.
    pub workload: Workload,
    /// Each scheduled fault and what injecting it did (or why it failed).
    pub faults: Vec<(Fault, Result<String, String>)>,
    /// What the producer was told.
    pub publishing: Publishing,
    /// What the operator did (none if the first drain ran out of time).
    pub operations: Option<Operations>,
    /// What was left behind.
    pub evidence: Evidence,
    /// The invariants.
    pub verdicts: Vec<Verdict>,
    /// The server version.
    pub server: String,
    /// Wall-clock time of the run.
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether every invariant held and every fault was injected.
    pub fn passed(&self) -> bool {
        self.verdicts.iter().all(|v| v.passed) && self.faults.iter().all(|(_, r)| r.is_ok())
    }
}

/// Runs the suite once.
pub async fn run(settings: Settings) -> Fallible<Outcome> {
    let began = Instant::now();
    let workload = Workload::generate(settings.seed, settings.messages);
    let nodes = if settings.cluster { 3 } else { 1 };
    let planned = schedule(
        settings.seed,
        settings.faults,
        settings.window,
        settings.workers,
        nodes,
    );
    eprintln!("fault schedule:");
    for fault in &planned {
        eprintln!("  {fault}");
    }
    let mut deployment = Deployment::start(settings.cluster, settings.workers).await?;
    let server = deployment.servers.version();
    workers_ready(&deployment).await?;

    let start = Instant::now();
    let publisher = Publisher::new(deployment.producer.clone());
    let publishing = tokio::spawn(publish(publisher, workload.clone(), start, settings.window));

    let mut faults = Vec::new();
    for fault in planned {
        sleep_until(start + fault.at).await;
        let began = start.elapsed().as_secs_f64();
        let result = deployment.inject(&fault).await.map_err(|e| e.to_string());
        eprintln!("  t+{began:>6.1}s  {}: {result:?}", fault.kind.name());
        faults.push((fault, result));
    }
    let publishing = publishing.await?;
    eprintln!(
        "published {} sends in {:.1}s; draining",
        publishing.confirmed,
        start.elapsed().as_secs_f64()
    );
    let drained = deployment.drain(settings.drain_timeout).await?;
    // The operator's turn, with the workers running: a fix and two replays
    // at once, forgotten keys sent again. Then the stream drains again.
    let operations = if drained {
        eprintln!("drained; the operator fixes, replays, forgets and resends");
        let operations = act(&deployment, &workload).await?;
        eprintln!(
            "operator: {} keys fixed and replayed, {} forgotten and resent; draining",
            operations.fixed.len(),
            operations.forgotten.len()
        );
        Some(operations)
    } else {
        None
    };
    let drained = drained && deployment.drain(settings.drain_timeout).await?;
    let exits = deployment.stop_workers().await;
    let evidence = gather(&deployment, exits, drained).await?;
    let verdicts = check(
        &workload,
        &faults.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>(),
        &publishing,
        operations.as_ref(),
        &evidence,
    );
    let outcome = Outcome {
        settings,
        workload,
        faults,
        publishing,
        operations,
        evidence,
        verdicts,
        server,
        elapsed: began.elapsed(),
    };
    if !outcome.passed() {
        eprintln!("worker logs kept in {}", deployment.keep_logs().display());
    }
    Ok(outcome)
}

/// Waits until all workers have created their consumers.
async fn workers_ready(deployment: &Deployment) -> Fallible<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while deployment.outstanding().await.is_err() {
        if Instant::now() > deadline {
            return Err("the workers did not create their consumers within 60 s".into());
        }
        sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Publishes the workload through the [`Publisher`], spread evenly over
/// `window`, with a bounded number of sends in flight.
async fn publish(
    publisher: Publisher,
    workload: Workload,
    start: Instant,
    window: Duration,
) -> Publishing {
    let total = workload.messages.len().max(1);
    let sends = futures::stream::iter(workload.messages.into_iter().enumerate())
        .map(|(i, planned)| {
            let publisher = publisher.clone();
            let at = start + window.mul_f64(i as f64 / total as f64);
            async move {
                sleep_until(at).await;
                let message = Outgoing::json(planned.level.subject(), &planned.order)
                    .map(|m| m.with_id(planned.message_id.clone()));
                match message {
                    Ok(message) => publisher
                        .send(message)
                        .await
                        .map_err(|e| format!("{}: {e}", planned.message_id)),
                    Err(e) => Err(format!("{}: {e}", planned.message_id)),
                }
            }
        })
        .buffered(PUBLISH_WINDOW);
    futures::pin_mut!(sends);
    let mut publishing = Publishing::default();
    while let Some(result) = sends.next().await {
        match result {
            Ok(published) => {
                publishing.confirmed += 1;
                publishing.duplicates += usize::from(published.duplicate);
            }
            Err(e) => publishing.failed.push(e),
        }
    }
    publishing
}
