//! The batching scheduler: one thread owns the model's forward passes.
//!
//! Every active sequence advances by one token per batched forward pass (continuous batching),
//! so concurrent requests share each layer step's expert loads. A new request's prompt rides in
//! the same pass as the decoding sequences when the rows fit the row-invariant kernels
//! (`kernels::ROW_INVARIANT_MAX`), so an arrival costs no pass of its own; a prompt too long to
//! fit beside them is prefilled alone, exactly as `moehost generate` does. Either way every
//! token is the one `generate` produces. With A/B arms, each arm's sequences form their own
//! batch on the arm's store, one forward pass per arm per step.
//! A request whose client went away is dropped at the next step.
//! Owns: admission, batching, cancellation. Does not own: HTTP, picking the arm.

use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

use super::arms::Arms;
use super::metrics::Metrics;
use crate::engine::{Engine, SequenceState};
use crate::model::sampling::SamplingParams;
use crate::Sequence;

/// What a handler asks for.
pub struct GenRequest {
    /// Index into the server's arms.
    pub arm: usize,
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub params: SamplingParams,
    pub stop: Vec<String>,
    /// Special tokens kept in the text (a tool-call parser's markers).
    pub keep_special: Vec<u32>,
    /// Report each token's log-probability with this many alternatives.
    pub logprobs: Option<usize>,
    /// Added to these tokens' logits before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// The grammar the output must follow.
    pub constraint: Option<crate::structured::Constraint>,
    pub events: mpsc::UnboundedSender<GenEvent>,
    pub received: Instant,
}

/// What the scheduler answers, in order: text pieces, then one `Done` (or an `Error`).
#[derive(Debug)]
pub enum GenEvent {
    /// Log-probabilities of the tokens behind the text that follows (requested only).
    Logprobs(Vec<crate::engine::TokenLogprob>),
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(String),
}

struct Active {
    arm: usize,
    seq: SequenceState,
    events: mpsc::UnboundedSender<GenEvent>,
    received: Instant,
    /// When its latest token was delivered (`None` before the first).
    last_token: Option<Instant>,
    /// Completion tokens already added to the metrics.
    counted: usize,
}

/// Most sequences advanced by one forward pass (row-invariant kernels keep batched decode
/// bit-identical to single-stream up to `kernels::ROW_INVARIANT_MAX` rows per expert).
pub const MAX_BATCH: usize = 32;

/// Runs until `queue` closes and every active sequence is done.
pub fn run(
    engine: Arc<Engine>,
    arms: Arc<Arms>,
    mut queue: mpsc::Receiver<GenRequest>,
    metrics: Arc<Metrics>,
    stopping: Arc<AtomicBool>,
) {
    let mut active: Vec<Active> = Vec::new();
    loop {
        // Admit: block when idle, otherwise take what is waiting (up to the batch size).
        let mut admitted = Vec::new();
        if active.is_empty() {
            match queue.blocking_recv() {
                Some(r) => admitted.extend(admit(&engine, &arms, r, &metrics)),
                None => return,
            }
        }
        while active.len() + admitted.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(r) => admitted.extend(admit(&engine, &arms, r, &metrics)),
                Err(_) => break,
            }
        }
        // A prompt that cannot share a pass with its arm's decoding sequences runs alone now;
        // the others join the next steps.
        active.extend(admitted);
        let mut decoding = vec![0; arms.arms.len()];
        for a in active.iter().filter(|a| a.seq.next_input().is_some()) {
            decoding[a.arm] += 1;
        }
        let alone: Vec<Active> = active
            .extract_if(.., |a| {
                a.seq.awaits_prefill()
                    && decoding[a.arm] + a.seq.prompt_tokens_len()
                        > crate::kernels::ROW_INVARIANT_MAX
            })
            .collect();
        prefill(&engine, &arms, alone, &mut active, &metrics);
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
        // One step for every active sequence: one batch per arm.
        for arm in 0..arms.arms.len() {
            step(&engine, &arms, arm, &mut active, &metrics);
        }
    }
}

/// Advances every decoding sequence of `arm` by one token and prefills the waiting prompts that
/// fit beside them (`kernels::ROW_INVARIANT_MAX` rows in all, so each row's result is the one
/// it would have alone), in one batched forward pass on the arm's store.
fn step(engine: &Engine, arms: &Arms, arm: usize, active: &mut [Active], metrics: &Metrics) {
    let decoding = active
        .iter()
        .filter(|a| a.arm == arm && a.seq.next_input().is_some())
        .count();
    let mut rows = decoding;
    let mut batch: Vec<&mut Active> = Vec::new();
    for a in active.iter_mut().filter(|a| a.arm == arm) {
        if a.seq.next_input().is_some() {
            batch.push(a);
        } else if a.seq.awaits_prefill()
            && rows + a.seq.prompt_tokens_len() <= crate::kernels::ROW_INVARIANT_MAX
        {
            rows += a.seq.prompt_tokens_len();
            if decoding > 0 {
                metrics.prefills_in_step.fetch_add(1, Ordering::Relaxed);
            }
            batch.push(a);
        }
    }
    if batch.is_empty() {
        return;
    }
    let inputs: Vec<[u32; 1]> = batch
        .iter()
        .map(|a| [a.seq.next_input().unwrap_or_default()])
        .collect();
    let t0 = Instant::now();
    let result = {
        let mut seqs: Vec<Sequence> = batch
            .iter_mut()
            .zip(&inputs)
            .map(|(a, next)| a.seq.step_input(next))
            .collect();
        engine
            .model
            .forward_batch_on(&*arms.arms[arm].store, &mut seqs)
    };
    let ns = t0.elapsed().as_nanos() as u64;
    metrics
        .step
        .get_or_create(&super::metrics::arm_label(&arms.arms[arm].name))
        .observe(ns as f64 / 1e9);
    let am = &arms.arms[arm].metrics;
    for (steps, time) in [
        (&metrics.decode_steps, &metrics.decode_ns),
        (&am.decode_steps, &am.decode_ns),
    ] {
        steps.fetch_add(1, Ordering::Relaxed);
        time.fetch_add(ns, Ordering::Relaxed);
    }
    match result {
        Ok(logits) => {
            // Sampling and detokenizing are per sequence: spread them over the cores.
            let pieces: Vec<_> = batch
                .par_iter_mut()
                .zip(logits.par_iter())
                .map(|(a, l)| a.seq.accept(engine, l))
                .collect();
            for (a, r) in batch.iter_mut().zip(pieces) {
                deliver(a, r, metrics, arms);
            }
        }
        Err(e) => {
            for a in batch {
                let _ = a.events.send(GenEvent::Error(format!("{e:#}")));
                a.seq.abort();
            }
        }
    }
}

/// A request accepted for generation, not prefilled yet (`None`: refused or gone).
fn admit(engine: &Engine, arms: &Arms, r: GenRequest, metrics: &Metrics) -> Option<Active> {
    if r.events.is_closed() {
        return None;
    }
    let arm = r.arm.min(arms.arms.len() - 1);
    let seq = match SequenceState::new(engine, &r.prompt_ids, r.max_tokens, &r.params, r.stop) {
        Ok(s) => s
            .keep_special_tokens(r.keep_special)
            .with_logprobs(r.logprobs)
            .with_logit_bias(r.logit_bias)
            .with_constraint(r.constraint),
        Err(e) => {
            let _ = r.events.send(GenEvent::Error(format!("{e:#}")));
            return None;
        }
    };
    metrics
        .queue_wait
        .observe(r.received.elapsed().as_secs_f64());
    let am = &arms.arms[arm].metrics;
    am.requests.fetch_add(1, Ordering::Relaxed);
    for c in [&metrics.prompt_tokens, &am.prompt_tokens] {
        c.fetch_add(r.prompt_ids.len() as u64, Ordering::Relaxed);
    }
    Some(Active {
        arm,
        seq,
        events: r.events,
        received: r.received,
        last_token: None,
        counted: 0,
    })
}

/// Prefills admitted requests that cannot join a step: short prompts of the same arm share a
/// forward pass (up to `kernels::ROW_INVARIANT_MAX` prompt tokens in all, so each result is the
/// one it would be alone); longer prompts run alone, as `generate` runs them.
fn prefill(
    engine: &Engine,
    arms: &Arms,
    admitted: Vec<Active>,
    active: &mut Vec<Active>,
    metrics: &Metrics,
) {
    let limit = crate::kernels::ROW_INVARIANT_MAX;
    let mut pending = admitted;
    while !pending.is_empty() {
        let arm = pending[0].arm;
        let mut group = Vec::new();
        let mut rows = 0;
        let mut rest = Vec::new();
        for a in pending {
            let n = a.seq.prompt_tokens_len();
            if a.arm == arm && (group.is_empty() || rows + n <= limit) {
                rows += n;
                group.push(a);
            } else {
                rest.push(a);
            }
        }
        pending = rest;
        let one_by_one = group.len() == 1 || rows > limit;
        let passes = if one_by_one { group.len() } else { 1 };
        metrics
            .prefill_passes
            .fetch_add(passes as u64, Ordering::Relaxed);
        let store = &*arms.arms[arm].store;
        let firsts = if one_by_one {
            group
                .iter_mut()
                .map(|a| a.seq.prefill_on(engine, Some(store)))
                .collect()
        } else {
            let mut seqs: Vec<&mut SequenceState> = group.iter_mut().map(|a| &mut a.seq).collect();
            SequenceState::prefill_group(engine, store, &mut seqs)
        };
        for (mut a, first) in group.into_iter().zip(firsts) {
            deliver(&mut a, first, metrics, arms);
            if !a.seq.is_finished() {
                active.push(a);
            }
        }
    }
}

/// Sends new text and, when the sequence ended, its summary.
fn deliver(a: &mut Active, piece: anyhow::Result<Option<String>>, metrics: &Metrics, arms: &Arms) {
    let am = &arms.arms[a.arm].metrics;
    let produced = a.seq.completion_tokens().saturating_sub(a.counted);
    if produced > 0 {
        let now = Instant::now();
        let name = &arms.arms[a.arm].name;
        match a.last_token {
            None => metrics.observe_ttft(name, now - a.received),
            Some(t) => metrics
                .inter_token
                .get_or_create(&super::metrics::arm_label(name))
                .observe((now - t).as_secs_f64()),
        }
        a.last_token = Some(now);
    }
    a.counted = a.seq.completion_tokens();
    for c in [&metrics.completion_tokens, &am.completion_tokens] {
        c.fetch_add(produced as u64, Ordering::Relaxed);
    }
    let logprobs = a.seq.take_logprobs();
    if !logprobs.is_empty() {
        let _ = a.events.send(GenEvent::Logprobs(logprobs));
    }
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
