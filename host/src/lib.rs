//! moehost: run giant Mixture-of-Experts models (DeepSeek-V3, Kimi-K2) with every expert
//! available and memory policies as WebAssembly plugins.
//!
//! Map (see ARCHITECTURE.md): `model::config` -> `weights` (checkpoint, fp8, quant, expert
//! forms) -> `model::deepseek_v3` (uses `kernels`, `model::{rope, router}`, `experts`) ->
//! `engine` (tokenizer, generation, `model::sampling`). `experts::tiered` is the tiered store,
//! `policy` the plugins behind it, `replay` the lab that replays routing through them.
//! `forward_dump` writes the verification tensors; `bench` measures throughput.

pub mod bench;
pub mod chat;
pub mod compress;
pub mod doctor;
pub mod engine;
pub mod experts;
pub mod forward_dump;
#[cfg(feature = "cuda")]
pub mod gpu;
/// Without the `cuda` feature: the GPU API with nothing constructible (`gpu/off.rs`).
#[cfg(not(feature = "cuda"))]
#[path = "gpu/off.rs"]
pub mod gpu;
pub mod hardware;
pub mod kernels;
pub mod model;
pub mod plan;
pub mod policy;
pub mod replay;
pub mod server;
pub mod structured;
pub mod tokenizer;
pub mod trace;
pub mod transfer;
pub mod weights;

pub use engine::{bundled_model_dir, Engine, Generation};
pub use model::config::ModelConfig;
pub use model::deepseek_v3::{DeepseekV3, ForwardOutput, KvCache, Logits, Sequence};
pub use model::sampling::SamplingParams;
