//! Decode throughput of the engine alone (no HTTP) at batch sizes 1..32, with every expert
//! resident, and with the tiered store and its default policies.
use moehost::store::StoreConfig;
use moehost::{Engine, Logits, Sequence};
use std::time::Instant;

fn measure(engine: &Engine, batch: usize, steps: usize) -> f64 {
    let model = &engine.model;
    let mut caches: Vec<_> = (0..batch).map(|_| model.new_cache()).collect();
    for (i, c) in caches.iter_mut().enumerate() {
        model
            .forward(&[0, 100 + i as u32, 7], c, Logits::Last, false)
            .unwrap();
    }
    let t0 = Instant::now();
    let mut next: Vec<[u32; 1]> = (0..batch).map(|i| [(i * 37 % 4000) as u32 + 5]).collect();
    for _ in 0..steps {
        let mut seqs: Vec<Sequence> = next
            .iter()
            .zip(caches.iter_mut())
            .map(|(ids, cache)| Sequence { ids, cache })
            .collect();
        let out = model.forward_batch(&mut seqs).unwrap();
        for (n, l) in next.iter_mut().zip(&out) {
            n[0] = moehost::sampling::argmax(l);
        }
    }
    (batch * steps) as f64 / t0.elapsed().as_secs_f64()
}

fn main() {
    let dir = moehost::bundled_model_dir();
    let resident = Engine::open(&dir).unwrap();
    let (tiered, _store) = Engine::open_tiered(&dir, &StoreConfig::default()).unwrap();
    for batch in [1, 4, 8, 16, 32] {
        println!(
            "batch {batch:2}: resident {:6.0} tokens/s, tiered store {:6.0} tokens/s",
            measure(&resident, batch, 64),
            measure(&tiered, batch, 64)
        );
    }
}
