//! Every tensor the architecture reads, checked by its header (name, shape, dtype, scales)
//! before any weight is read.

use anyhow::{ensure, Context, Result};

use crate::experts::expert_prefix;
use crate::model::config::ModelConfig;
use crate::weights::checkpoint::Checkpoint;

/// Checks that every tensor the architecture reads exists with the right shape and a
/// supported dtype, reading headers only.
pub(crate) fn check_tensors(cfg: &ModelConfig, ckpt: &Checkpoint) -> Result<()> {
    let h = cfg.hidden_size;
    let nh = cfg.num_attention_heads;
    let qk = cfg.qk_head_dim();
    let lora = cfg.kv_lora_rank;
    let mut want: Vec<(String, Vec<usize>)> = vec![
        ("model.embed_tokens.weight".into(), vec![cfg.vocab_size, h]),
        ("model.norm.weight".into(), vec![h]),
    ];
    if !cfg.tie_word_embeddings {
        want.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    let ffn = |want: &mut Vec<(String, Vec<usize>)>, p: String, i: usize| {
        want.push((format!("{p}.gate_proj.weight"), vec![i, h]));
        want.push((format!("{p}.up_proj.weight"), vec![i, h]));
        want.push((format!("{p}.down_proj.weight"), vec![h, i]));
    };
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let a = format!("{p}.self_attn");
        want.push((format!("{p}.input_layernorm.weight"), vec![h]));
        want.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        match cfg.q_lora_rank {
            Some(r) => {
                want.push((format!("{a}.q_a_proj.weight"), vec![r, h]));
                want.push((format!("{a}.q_a_layernorm.weight"), vec![r]));
                want.push((format!("{a}.q_b_proj.weight"), vec![nh * qk, r]));
            }
            None => want.push((format!("{a}.q_proj.weight"), vec![nh * qk, h])),
        }
        want.push((
            format!("{a}.kv_a_proj_with_mqa.weight"),
            vec![lora + cfg.qk_rope_head_dim, h],
        ));
        want.push((format!("{a}.kv_a_layernorm.weight"), vec![lora]));
        want.push((
            format!("{a}.kv_b_proj.weight"),
            vec![nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), lora],
        ));
        want.push((format!("{a}.o_proj.weight"), vec![h, nh * cfg.v_head_dim]));
        if cfg.is_moe_layer(l) {
            want.push((
                format!("{p}.mlp.gate.weight"),
                vec![cfg.n_routed_experts, h],
            ));
            want.push((
                format!("{p}.mlp.gate.e_score_correction_bias"),
                vec![cfg.n_routed_experts],
            ));
            if cfg.n_shared_experts > 0 {
                ffn(
                    &mut want,
                    format!("{p}.mlp.shared_experts"),
                    cfg.moe_intermediate_size * cfg.n_shared_experts,
                );
            }
            for e in 0..cfg.n_routed_experts as u32 {
                ffn(&mut want, expert_prefix(l, e), cfg.moe_intermediate_size);
            }
        } else {
            ffn(&mut want, format!("{p}.mlp"), cfg.intermediate_size);
        }
    }
    // Headers only: no weight is read here.
    for (name, shape) in &want {
        let (dtype, stored) = ckpt.header(name)?;
        ensure!(
            stored == crate::weights::format::stored_shape(dtype, shape).as_slice(),
            "tensor {name} has shape {stored:?}, expected {shape:?} from config.json"
        );
        use crate::weights::format::WeightFormat;
        match WeightFormat::of_dtype(dtype) {
            Some(WeightFormat::F32 | WeightFormat::Bf16 | WeightFormat::F16) => {}
            Some(WeightFormat::Int8 | WeightFormat::Int4) => {
                ensure!(shape.len() == 2, "tensor {name} is quantized but not a 2-D weight");
                let scale_name = format!("{name}_qscale");
                let (_, scale) = ckpt
                    .header(&scale_name)
                    .with_context(|| format!("quantized tensor {name} needs its scales"))?;
                let want_scale = crate::weights::quant::scale_shape(shape[0], shape[1]);
                ensure!(
                    scale == want_scale,
                    "tensor {scale_name} has shape {scale:?}, expected {want_scale:?}"
                );
            }
            Some(WeightFormat::Fp8) => {
                ensure!(shape.len() == 2, "tensor {name} is F8_E4M3 but not a 2-D weight");
                ensure!(
                    cfg.fp8_block.is_some(),
                    "tensor {name} is F8_E4M3 but config.json has no quantization_config"
                );
                let [br, bc] = cfg.fp8_block.unwrap();
                let scale_name = format!("{name}_scale_inv");
                let (_, scale) = ckpt
                    .header(&scale_name)
                    .with_context(|| format!("FP8 tensor {name} needs its block scales"))?;
                let want_scale = [shape[0].div_ceil(br), shape[1].div_ceil(bc)];
                ensure!(
                    scale == want_scale,
                    "tensor {scale_name} has shape {scale:?}, expected {want_scale:?} ({br}x{bc} blocks of {shape:?})"
                );
            }
            None => anyhow::bail!(
                "tensor {name} has dtype {dtype:?}; moehost reads F32, BF16, F16, F8_E4M3 and its own int8/int4 (I8/U8) weights"
            ),
        }
    }
    Ok(())
}
