//! The batching scheduler: one thread owns the model's forward passes.
//!
//! New requests are prefilled one at a time (exactly as `moehost generate` does); then every
//! active sequence advances by one token per batched forward pass (continuous batching), so
//! concurrent requests share each layer step's expert loads. A request whose client went away
//! is dropped at the next step. Owns: admission, batching, cancellation. Does not own: HTTP.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

use super::metrics::Metrics;
use crate::engine::{Engine, SequenceState};
use crate::sampling::SamplingParams;
use crate::Sequence;

/// What a handler asks for.
pub struct GenRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub received: Instant,
}

/// What the scheduler answers, in order: text pieces, then one `Done` (or an `Error`).
#[derive(Debug)]
pub enum GenEvent {
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

struct Active {
    seq: SequenceState,
    events: mpsc::UnboundedSender<GenEvent>,
    received: Instant,
    first_token: bool,
    /// Completion tokens already added to the metrics.
    counted: usize,
}

/// Most sequences advanced by one forward pass (row-invariant kernels keep batched decode
/// bit-identical to single-stream up to `kernels::ROW_INVARIANT_MAX` rows per expert).
pub const MAX_BATCH: usize = 32;

/// Runs until `queue` closes and every active sequence is done.
pub fn run(
    engine: Arc<Engine>,
    mut queue: mpsc::Receiver<GenRequest>,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        // Admit: block when idle, otherwise take what is waiting (up to the batch size).
        if active.is_empty() {
            match queue.blocking_recv() {
                Some(r) => admit(&engine, r, &mut active, &metrics),
                None => return,
            }
        }
        while active.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(r) => admit(&engine, r, &mut active, &metrics),
                Err(_) => break,
            }
        }
        metrics
            .queue_depth
            .store(queue.len() as u64, Ordering::Relaxed);
        active.retain(|a| !a.seq.is_finished() && !a.events.is_closed());
        metrics.active.store(active.len() as u64, Ordering::Relaxed);
        if active.is_empty() {
            if stopping.load(Ordering::Relaxed) && queue.is_empty() {
                return;
            }
            continue;
        }
        // One decode step for every active sequence.
        let inputs: Vec<[u32; 1]> = active
            .iter()
            .map(|a| [a.seq.next_input().expect("active")])
            .collect();
        let t0 = Instant::now();
        let result = {
            let mut seqs: Vec<Sequence> = active
                .iter_mut()
                .zip(&inputs)
                .map(|(a, ids)| Sequence {
                    ids,
                    cache: &mut a.seq.cache,
                })
                .collect();
            engine.model.forward_batch(&mut seqs)
        };
        metrics.decode_steps.fetch_add(1, Ordering::Relaxed);
        metrics
            .decode_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match result {
            Ok(logits) => {
                for (a, l) in active.iter_mut().zip(&logits) {
                    let r = a.seq.accept(&engine, l);
                    deliver(a, r, &metrics);
                }
            }
            Err(e) => {
                for a in active.drain(..) {
                    let _ = a.events.send(GenEvent::Error(format!("{e:#}")));
                }
            }
        }
    }
}

fn admit(engine: &Engine, r: GenRequest, active: &mut Vec<Active>, metrics: &Metrics) {
    if r.events.is_closed() {
        return;
    }
    let mut seq = match SequenceState::new(engine, &r.prompt_ids, r.max_tokens, &r.params, r.stop) {
        Ok(s) => s,
        Err(e) => {
            let _ = r.events.send(GenEvent::Error(format!("{e:#}")));
            return;
        }
    };
    metrics
        .prompt_tokens
        .fetch_add(r.prompt_ids.len() as u64, Ordering::Relaxed);
    let first = seq.prefill(engine);
    let mut a = Active {
        seq,
        events: r.events,
        received: r.received,
        first_token: false,
        counted: 0,
    };
    deliver(&mut a, first, metrics);
    if !a.seq.is_finished() {
        active.push(a);
    }
}

/// Sends new text and, when the sequence ended, its summary.
fn deliver(a: &mut Active, piece: anyhow::Result<Option<String>>, metrics: &Metrics) {
    if !a.first_token {
        a.first_token = true;
        metrics.observe_ttft(a.received.elapsed());
    }
    let produced = a.seq.completion_tokens().saturating_sub(a.counted);
    a.counted = a.seq.completion_tokens();
    metrics
        .completion_tokens
        .fetch_add(produced as u64, Ordering::Relaxed);
    match piece {
        Ok(Some(text)) => {
            let _ = a.events.send(GenEvent::Text(text));
        }
        Ok(None) => {}
        Err(e) => {
            // The sequence ends here: it leaves the batch at the next step.
            a.seq.abort();
            let _ = a.events.send(GenEvent::Error(format!("{e:#}")));
            return;
        }
    }
    if let Some(reason) = a.seq.finish_reason() {
        let _ = a.events.send(GenEvent::Done {
            finish_reason: if reason == "eos" { "stop" } else { reason },
            prompt_tokens: a.seq.prompt_tokens(),
            completion_tokens: a.seq.completion_tokens(),
        });
    }
}

/// Counter of request ids.
pub fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
