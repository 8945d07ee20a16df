//! The MoE layer step (DeepseekV3MoE): route every token, ask the expert provider once for the
//! step's experts, run them, add the shared expert.

use super::*;

impl DeepseekV3 {
    /// DeepseekV3MoE: route, run the routed experts (ascending id, each output times its
    /// weight x routed_scaling_factor, summed in that order per token), add the shared expert.
    pub(super) fn moe(
        &self,
        provider: &dyn ExpertProvider,
        moe: &Moe,
        layer: usize,
        xn: &[f32],
        out: &mut [f32],
    ) -> Result<LayerRouting> {
        let h = self.cfg.hidden_size;
        let t = xn.len() / h;
        let k = moe.gate.top_k;
        let scores = moe.gate.scores(xn, h);
        ensure!(
            scores.sigmoid.iter().all(|x| x.is_finite()),
            "layer {layer}: the router's scores are not finite (NaN hidden states: the \
             checkpoint's weights or config.json's values are damaged)"
        );
        // Policies rank the model's own selection scores (group limit applied), so exact top-k
        // on them is the model's routing whatever the provider.
        let choice = moe.gate.selection_scores(&scores);
        let experts = match provider.select(layer, t, k, &choice) {
            Some(chosen) => chosen,
            None => moe.gate.top_k_rows(&choice),
        };
        let weights = moe.gate.weights_for(&scores, &experts);
        let routing = LayerRouting {
            top_k: k,
            experts,
            weights,
        };
        // Group token slots by expert.
        let n_experts = moe.gate.n_experts();
        let mut by_expert: Vec<Vec<(usize, f32)>> = vec![Vec::new(); n_experts];
        for (slot, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            by_expert[e as usize].push((slot / k, w * self.cfg.routed_scaling_factor));
        }
        let ids: Vec<u32> = (0..n_experts as u32)
            .filter(|&e| !by_expert[e as usize].is_empty())
            .collect();
        let tokens: Vec<u32> = ids
            .iter()
            .map(|&e| by_expert[e as usize].len() as u32)
            .collect();
        // Speculative routing, if the provider wants it: the next MoE layers' gates on this
        // layer's input.
        let outlook = |n: usize| -> Vec<(usize, Vec<f32>)> {
            self.layers
                .iter()
                .enumerate()
                .skip(layer + 1)
                .filter_map(|(l, next)| match &next.ffn {
                    Ffn::Moe(m) => {
                        let scores = m.gate.scores(xn, h);
                        Some((l, m.gate.selection_scores(&scores).into_owned()))
                    }
                    Ffn::Dense(_) => None,
                })
                .take(n)
                .collect()
        };
        let step = LayerStep {
            layer,
            tokens: t,
            experts: &ids,
            rows: &tokens,
            outlook: &outlook,
        };
        let weights = provider
            .step(&step)
            .with_context(|| format!("fetching experts of layer {layer}"))?;
        ensure!(
            weights.len() == ids.len(),
            "expert provider returned {} experts for {} requested",
            weights.len(),
            ids.len()
        );
        // Each expert's rows, then every expert (the shared one last) in one call: those in GPU
        // memory run together.
        let gather = |e: &u32| {
            let rows = &by_expert[*e as usize];
            let mut x = Vec::with_capacity(rows.len() * h);
            for &(tok, _) in rows {
                x.extend_from_slice(&xn[tok * h..(tok + 1) * h]);
            }
            x
        };
        let inputs: Vec<Vec<f32>> = if t > 1 {
            ids.par_iter().map(gather).collect()
        } else {
            ids.iter().map(gather).collect()
        };
        let mut jobs: Vec<(&ExpertWeights, &[f32])> = weights
            .iter()
            .zip(&inputs)
            .map(|(w, x)| (w, &x[..]))
            .collect();
        // A GPU shared expert joins the routed ones' launches; on the CPU it runs after them
        // with every core (as one task among the routed experts it would run on one).
        let shared_with_routed = moe.shared.as_ref().filter(|s| s.on_gpu());
        if let Some(shared) = shared_with_routed {
            jobs.push((shared, xn));
        }
        let mut outputs = ExpertWeights::forward_all(&jobs, h, t > 1)
            .with_context(|| format!("experts of layer {layer}"))?;
        let shared = match (&moe.shared, shared_with_routed) {
            (Some(_), Some(_)) => outputs.pop(),
            (Some(shared), None) => {
                let mut s = vec![0f32; t * h];
                shared
                    .forward(xn, h, &mut s)
                    .with_context(|| format!("shared expert of layer {layer}"))?;
                Some(s)
            }
            (None, _) => None,
        };
        out.iter_mut().for_each(|x| *x = 0.0);
        for (e, y) in ids.iter().zip(&outputs) {
            for (r, &(tok, w)) in by_expert[*e as usize].iter().enumerate() {
                axpy(w, &y[r * h..(r + 1) * h], &mut out[tok * h..(tok + 1) * h]);
            }
        }
        if let Some(s) = shared {
            add_inplace(out, &s);
        }
        Ok(routing)
    }
}
