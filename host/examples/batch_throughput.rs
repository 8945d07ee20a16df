//! Decode throughput of the engine alone (no HTTP) at batch sizes 1..32, with every expert
//! resident, and with the tiered store and its default policies. `moehost bench --batch N`
//! reports one batch size against the single stream.
use moehost::experts::tiered::StoreConfig;
use moehost::Engine;

fn main() -> anyhow::Result<()> {
    let dir = moehost::bundled_model_dir();
    let resident = Engine::open(&dir)?;
    let (tiered, _store) = Engine::open_tiered(&dir, &StoreConfig::default())?;
    let text = moehost::bench::text_ids(&resident, 512)?;
    for batch in [1, 4, 8, 16, 32] {
        println!(
            "batch {batch:2}: resident {:6.0} tokens/s, tiered store {:6.0} tokens/s",
            moehost::bench::batch_decode(&resident, &text, batch, 64, 1)?,
            moehost::bench::batch_decode(&tiered, &text, batch, 64, 1)?,
        );
    }
    Ok(())
}
