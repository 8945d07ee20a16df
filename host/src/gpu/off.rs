//! The GPU API in a build without the `cuda` feature: the same names, none of them
//! constructible (`gpu()` says why), so the model and the tiered store are written once, with
//! no `cfg`, and their GPU paths are simply never taken. candle's dummy CUDA backend is the
//! same idea.

use anyhow::Result;
use std::sync::Arc;

#[path = "types.rs"]
mod types;
pub use types::{ExpertSource, MlaDims, MlaSeq, MlaWeights};

use crate::policy::ExpertKey;
use crate::weights::ffn::{ExpertBytes, FfnWeights, OwnedTensor};
use crate::weights::format::WeightFormat;

/// Why there is no GPU here.
const NO_CUDA: &str = "this moehost was built without the `cuda` feature";

/// A CUDA device (none in this build).
pub enum Gpu {}

/// The device, once per process: never in this build.
pub fn gpu() -> Result<Arc<Gpu>, String> {
    Err(NO_CUDA.into())
}

/// A weight matrix in device memory.
pub enum GpuMatrix {}

impl GpuMatrix {
    pub fn upload(gpu: &Arc<Gpu>, _: &[f32], _: usize, _: usize) -> Result<Self> {
        match **gpu {}
    }

    pub fn upload_stored(
        gpu: &Arc<Gpu>,
        _: &OwnedTensor,
        _: usize,
        _: Option<[usize; 2]>,
    ) -> Result<Option<Self>> {
        match **gpu {}
    }

    pub fn device_bytes(&self) -> usize {
        match *self {}
    }

    pub fn format(&self) -> WeightFormat {
        match *self {}
    }

    pub fn forward(&self, _: &[f32], _: usize, _: &mut [f32]) -> Result<()> {
        match *self {}
    }
}

/// Bytes a device slot needs for `b`.
pub fn expert_slot_bytes(_: &ExpertBytes) -> Result<usize> {
    anyhow::bail!(NO_CUDA)
}

/// The device tier's expert slots.
pub enum GpuPool {}

impl GpuPool {
    pub fn new(gpu: &Arc<Gpu>, _: usize, _: usize, _: usize) -> Result<Self> {
        match **gpu {}
    }

    pub fn load(self: &Arc<Self>, _: ExpertKey, _: ExpertSource<'_>) -> Result<Option<GpuExpert>> {
        match **self {}
    }

    pub fn name(&self) -> &str {
        match *self {}
    }

    pub fn stats(&self) -> crate::transfer::TransferStats {
        match *self {}
    }
}

/// An expert in device memory.
pub enum GpuExpert {}

impl GpuExpert {
    pub fn upload(gpu: &Arc<Gpu>, _: &FfnWeights) -> Result<Self> {
        match **gpu {}
    }

    pub fn upload_stored(gpu: &Arc<Gpu>, _: &ExpertBytes) -> Result<Self> {
        match **gpu {}
    }

    pub fn device_bytes(&self) -> usize {
        match *self {}
    }

    pub fn formats(&self) -> [WeightFormat; 2] {
        match *self {}
    }

    pub fn forward(&self, _: &[f32], _: usize, _: &mut [f32]) -> Result<()> {
        match *self {}
    }
}

/// Every job's output (there are none: no expert is ever on a GPU here).
pub fn forward_experts(jobs: &[(&GpuExpert, &[f32])], _: usize) -> Result<Vec<Vec<f32>>> {
    match jobs.first() {
        Some((e, _)) => match **e {},
        None => Ok(Vec::new()),
    }
}

pub fn measure_expert(
    gpu: &Arc<Gpu>,
    _: &[ExpertBytes],
    _: usize,
) -> Result<crate::hardware::ExpertSpeed> {
    match **gpu {}
}

/// A sequence's KV cache of one layer in device memory (always empty here).
#[derive(Default)]
pub struct DeviceKv {}

impl DeviceKv {
    pub fn device_bytes(&self) -> usize {
        0
    }
}

/// Attention of one layer on the GPU.
pub enum GpuMla {}

impl GpuMla {
    pub fn new(gpu: &Arc<Gpu>, _: Option<&[f32]>, _: &[f32], _: MlaDims) -> Result<Self> {
        match **gpu {}
    }

    pub fn set_scores_max(&mut self, _: usize) {
        match *self {}
    }

    pub fn forward(
        &self,
        _: &MlaWeights<'_>,
        _: &[f32],
        _: &[f32],
        _: &mut [MlaSeq<'_>],
    ) -> Result<Vec<f32>> {
        match *self {}
    }
}
