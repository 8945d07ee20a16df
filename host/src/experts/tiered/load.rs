//! Reading an expert into its storage form (host tier) or compute form (device tier).

use anyhow::Result;
use std::sync::Arc;

use crate::experts::{ExpertBytes, ExpertWeights};
use crate::policy::ExpertKey;

use super::Inner;

impl Inner {
    /// `key` in storage format: the host tier's copy if given, else read from the checkpoint.
    pub(super) fn stored(
        &self,
        key: ExpertKey,
        host: Option<Arc<ExpertBytes>>,
    ) -> Result<Arc<ExpertBytes>> {
        match host {
            Some(b) => Ok(b),
            None => {
                let layer = self.moe_layers[key.layer as usize];
                Ok(Arc::new(ExpertBytes::read(&self.ckpt, layer, key.expert)?))
            }
        }
    }

    /// The device tier's form of `key`, from the host tier if there, else from the checkpoint.
    /// On a GPU store an expert to be `cached` is copied into GPU memory (when a slot is free);
    /// one computed once and dropped stays on the CPU. On the CPU an expert its kernels compute
    /// as stored (`ExpertBytes::runs_stored`) is the host tier's copy or a view of the mapped
    /// checkpoint, never a second copy; others are decoded to their compute form.
    pub(super) fn load_compute(
        &self,
        key: ExpertKey,
        host: Option<Arc<ExpertBytes>>,
        cached: bool,
    ) -> Result<ExpertWeights> {
        let layer = self.moe_layers[key.layer as usize];
        if let (Some(pool), true) = (&self.gpu, cached) {
            // The storage format crosses the link; the GPU converts FP8 and bf16 itself.
            let bytes = self.stored(key, host)?;
            let source = crate::gpu::ExpertSource::Stored(&bytes);
            if let Some(g) = pool.load(key, source)? {
                return Ok(ExpertWeights::Gpu(Arc::new(g)));
            }
            return Ok(ExpertWeights::Compute(Arc::new(bytes.to_ffn()?)));
        }
        let Some(stored) = host else {
            let prefix = crate::experts::expert_prefix(layer, key.expert);
            return ExpertWeights::for_cpu(&self.ckpt, &prefix, self.hidden, self.intermediate);
        };
        if stored.runs_stored(self.hidden, self.intermediate) {
            return Ok(ExpertWeights::Stored(stored));
        }
        Ok(ExpertWeights::Compute(Arc::new(stored.to_ffn()?)))
    }
}
