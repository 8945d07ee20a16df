//! The model: its configuration, the DeepSeek-V3 architecture (MLA attention, the MoE layer
//! step over an expert provider), the router, rotary embeddings and sampling.
//! Does not own: weight formats and reading them (`weights`), the arithmetic (`kernels`,
//! `gpu`), or where experts live (`experts`).

pub mod config;
pub mod deepseek_v3;
pub mod rope;
pub mod router;
pub mod sampling;
