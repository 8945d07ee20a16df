//! Weights as stored and as computed: the checkpoint's shards (memory-mapped, headers checked),
//! the storage formats (`format`: the one place a dtype is recognised), FP8 block
//! dequantization, moehost's group-wise int8/int4, and an expert's two forms (storage bytes and
//! compute form).

pub mod checkpoint;
pub mod ffn;
pub mod format;
pub mod fp8;
pub mod q8;
pub mod quant;
pub mod scales;
pub mod stored_bytes;
pub mod stored_dot;
