//! moehost: run giant Mixture-of-Experts models (DeepSeek-V3, Kimi-K2) with every expert
//! available and memory policies as WebAssembly plugins.
//!
//! Map (see ARCHITECTURE.md): `config` -> `checkpoint` (+ `fp8`) -> `deepseek_v3` (uses
//! `kernels`, `rope`, `router`, `experts`) -> `engine` (tokenizer, generation, `sampling`).
//! `forward_dump` writes the verification tensors; `bench` measures throughput.

pub mod bench;
pub mod chat;
pub mod checkpoint;
pub mod compress;
pub mod config;
pub mod deepseek_v3;
pub mod doctor;
pub mod engine;
pub mod experts;
pub mod ffn;
pub mod forward_dump;
pub mod fp8;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod hardware;
pub mod kernels;
pub mod plan;
pub mod policy;
pub mod quant;
pub mod replay;
pub mod rope;
pub mod router;
pub mod sampling;
pub mod server;
pub mod structured;
pub mod tokenizer;
pub mod trace;
pub mod transfer;

pub use config::ModelConfig;
pub use deepseek_v3::{DeepseekV3, ForwardOutput, KvCache, Logits, Sequence};
pub use engine::{bundled_model_dir, Engine, Generation};
pub use sampling::SamplingParams;
