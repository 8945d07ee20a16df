//! Shapes tiny-k2 does not have, against transformers (see tests/data/variants/README.md):
//! grouped routing (n_group 4, topk_group 2) with 2 shared experts and tied embeddings, no
//! q-LoRA with rope_interleave false and no rope scaling and 2 dense layers, and 8 heads with
//! v_head_dim != qk_nope_head_dim under YaRN, and DeepSeek-V3's routing shape (64 experts in 8
//! groups, the 4 best kept, top-8).

mod support;

use moehost::experts::ResidentExperts;
use moehost::model::sampling::argmax;
use moehost::weights::checkpoint::Checkpoint;
use moehost::{DeepseekV3, Logits, ModelConfig};
use std::sync::Arc;
use support::{max_abs_diff, Golden};

fn check(name: &str) {
    let dir = support::data_dir().join("variants").join(name);
    let cfg = ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Arc::new(Checkpoint::open(&dir, cfg.quantization()).unwrap());
    let experts = Arc::new(ResidentExperts::new(ckpt.clone(), &cfg));
    let model = DeepseekV3::load(cfg.clone(), &ckpt, experts).unwrap();
    let golden = Golden::from_path(&dir.join("golden.safetensors"));
    let (v, k) = (cfg.vocab_size, cfg.num_experts_per_tok);
    let n_moe = cfg.moe_layers().len();
    for p in 0..golden.prompts() {
        let ids = golden.ids(p, "input_ids");
        let t = ids.len();
        let dump = moehost::forward_dump::run(&model, &ids).unwrap();
        let d = max_abs_diff(&dump.logits, &golden.get(p, "logits").f32);
        assert!(d <= 1e-3, "{name} prompt{p}: logits differ by {d}");
        assert_eq!(golden.get(p, "logits").shape, [t, v]);
        let ge = &golden.get(p, "routed_experts").i32;
        let gw = &golden.get(p, "routed_weights").f32;
        for li in 0..n_moe {
            for tok in 0..t {
                let ours = &dump.routed_experts[(tok * n_moe + li) * k..][..k];
                assert_eq!(
                    ours,
                    &ge[(li * t + tok) * k..][..k],
                    "{name} prompt{p} layer {li} token {tok}"
                );
                let w = max_abs_diff(
                    &dump.routed_weights[(tok * n_moe + li) * k..][..k],
                    &gw[(li * t + tok) * k..][..k],
                );
                assert!(
                    w < 1e-5,
                    "{name} prompt{p} layer {li} token {tok}: weights differ by {w}"
                );
            }
        }
        let want = golden.ids(p, "greedy_ids");
        let mut cache = model.new_cache();
        let mut logits = model
            .forward(&ids, &mut cache, Logits::Last, false)
            .unwrap()
            .logits;
        let mut got = Vec::new();
        for _ in 0..want.len() {
            let next = argmax(&logits);
            got.push(next);
            logits = model
                .forward(&[next], &mut cache, Logits::Last, false)
                .unwrap()
                .logits;
        }
        assert_eq!(got, want, "{name} prompt{p}: greedy continuation");
    }
}

#[test]
fn grouped_routing_shared_experts_tied_embeddings() {
    check("grouped");
}

#[test]
fn no_q_lora_no_rope_scaling_rotate_half() {
    check("no-qlora");
}

#[test]
fn wide_heads_yarn() {
    check("wide-heads");
}

#[test]
fn deepseek_v3_group_routing_64_experts_8_groups_top_8() {
    check("dsv3-groups");
}

/// Kimi-K2-Thinking's layout: routed experts as compressed-tensors packed INT4, against
/// transformers on the exactly dequantized weights.
#[test]
fn compressed_tensors_int4_experts() {
    let dir = support::data_dir().join("variants/dsv3-groups-int4");
    assert!(ModelConfig::from_dir(&dir).unwrap().packed_int4);
    check("dsv3-groups-int4");
}
