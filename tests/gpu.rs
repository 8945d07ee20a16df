//! The GPU suite (`--features cuda`): routed experts computed on the GPU give the CPU's bits,
//! and a generation whose device tier lives on the GPU equals the all-resident CPU run. Each
//! test runs where a CUDA driver and device are present and says why it skipped elsewhere.
#![cfg(feature = "cuda")]

mod support;

use moehost::checkpoint::Checkpoint;
use moehost::experts::{ExpertBytes, OwnedTensor};
use moehost::gpu::{gpu, ExpertSource, GpuExpert, GpuMatrix, GpuPool};
use moehost::kernels::{grouped_rows, linear};
use moehost::policy::ExpertKey;
use moehost::policy::PolicySource;
use moehost::store::{Device, StoreConfig};
use moehost::{Engine, Logits};
use std::sync::Arc;

fn device_or_skip() -> Option<std::sync::Arc<moehost::gpu::Gpu>> {
    match gpu() {
        Ok(g) => Some(g),
        Err(why) => {
            eprintln!("skipped: {why}");
            None
        }
    }
}

#[test]
fn experts_on_the_gpu_give_the_cpus_bits() {
    let Some(g) = device_or_skip() else { return };
    let dir = support::fp8_model();
    let cfg = moehost::ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, cfg.fp8_block).unwrap();
    let h = cfg.hidden_size;
    for (layer, expert) in [(1, 0), (4, 37), (7, 63)] {
        let cpu = ExpertBytes::read(&ckpt, layer, expert)
            .unwrap()
            .to_ffn()
            .unwrap();
        let on_gpu = GpuExpert::upload(&g, &cpu).unwrap();
        support::assert_same_bits(
            &[1, 2, 7, 64, 65],
            [h, h],
            expert,
            |x, out| cpu.forward(x, h, out),
            |x, out| on_gpu.forward(x, h, out).unwrap(),
            &format!("expert {expert} of layer {layer}"),
        );
    }
}

#[test]
fn attention_projections_on_the_gpu_give_the_cpus_bits() {
    let Some(g) = device_or_skip() else { return };
    let dir = support::fp8_model();
    let cfg = moehost::ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, cfg.fp8_block).unwrap();
    let (h, nh, v) = (cfg.hidden_size, cfg.num_attention_heads, cfg.v_head_dim);
    // o_proj [hidden, heads * v]: a plain projection, the CPU's matvec and row kernels.
    let o = ckpt
        .read_f32("model.layers.2.self_attn.o_proj.weight", &[h, nh * v])
        .unwrap();
    let on_gpu = GpuMatrix::upload(&g, &o, 1, nh * v).unwrap();
    support::assert_same_bits(
        &[1, 2, 7, 64],
        [nh * v, h],
        2,
        |x, out| linear(x, &o, nh * v, out),
        |x, out| on_gpu.forward(x, nh * v, out).unwrap(),
        "o_proj",
    );
    // kv_b_proj as one matrix per head, over inputs wider than a head's rows (as W_UK^T reads
    // q_nope out of [q_nope | q_rope]): the per-head kernel, at any token count.
    let (nope, lora) = (cfg.qk_nope_head_dim, cfg.kv_lora_rank);
    let kv_b = ckpt
        .read_f32(
            "model.layers.2.self_attn.kv_b_proj.weight",
            &[nh * (nope + v), lora],
        )
        .unwrap();
    let per_head = GpuMatrix::upload(&g, &kv_b, nh, lora).unwrap();
    let stride = lora + 5;
    support::assert_same_bits(
        &[1, 3, 65],
        [nh * stride, nh * (nope + v)],
        7,
        |x, out| grouped_rows(&kv_b, nh, lora, x, stride, out),
        |x, out| per_head.forward(x, stride, out).unwrap(),
        "per head",
    );
}

/// Above `ROW_INVARIANT_MAX` rows the CPU's projections switch to a blocked GEMM and the GPU's
/// keep the row kernel, so a long prefill's bits are the backend's own: every budget and
/// placement on the GPU gives the same ones, within float tolerance of the CPU's.
#[test]
fn a_long_prefill_on_the_gpu_is_the_same_under_every_budget() {
    if device_or_skip().is_none() {
        return;
    }
    let dir = support::fp8_model();
    let prompt = "<|bos|>".to_owned()
        + &"The software is distributed in the hope that it will be useful. ".repeat(8);
    let logits = |engine: &Engine| {
        let ids = engine.encode(&prompt).unwrap();
        assert!(
            ids.len() > moehost::kernels::ROW_INVARIANT_MAX,
            "{} tokens",
            ids.len()
        );
        let out = engine
            .model
            .forward(&ids, &mut engine.model.new_cache(), Logits::All, false)
            .unwrap();
        out.logits
    };
    let cpu = logits(&Engine::open(&dir).unwrap());
    let mut first: Option<Vec<f32>> = None;
    for (slots, placement, link) in [
        (None, "cost-model", "local"),
        (Some(30), "cost-model", "h100-pcie5"),
        (Some(20), "hot-fetch", "h100-pcie5"),
    ] {
        let c = StoreConfig {
            device_bytes: slots.map(|s| s * 3 * 256 * 64 * 4),
            placement: PolicySource::parse(placement),
            link: link.into(),
            device: Device::Cuda,
            ..Default::default()
        };
        let (engine, _store) = Engine::open_tiered(&dir, &c).unwrap();
        let gpu = logits(&engine);
        let worst = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "{slots:?} {placement} {link}: off the CPU by {worst}"
        );
        match &first {
            None => first = Some(gpu),
            Some(f) => assert!(
                support::bits(f) == support::bits(&gpu),
                "{slots:?} slots, {placement} on {link}: results differ from the first GPU run"
            ),
        }
    }
}

fn run(engine: &Engine) -> (Vec<u32>, Vec<u32>) {
    let ids = engine
        .encode("<|bos|>The software is distributed in the hope that it will be useful")
        .unwrap();
    let out = engine
        .model
        .forward(&ids, &mut engine.model.new_cache(), Logits::All, false)
        .unwrap();
    let gen = engine
        .generate(&ids, 24, &Default::default(), |_| {})
        .unwrap();
    (out.logits.iter().map(|x| x.to_bits()).collect(), gen.ids)
}

#[test]
fn a_device_tier_on_the_gpu_never_changes_a_token() {
    if device_or_skip().is_none() {
        return;
    }
    let dir = support::fp8_model();
    let baseline = run(&Engine::open(&dir).unwrap());
    const EXPERT_F32: u64 = 3 * 256 * 64 * 4;
    for (slots, placement, link) in [
        (None, "cost-model", "local"),
        (Some(40), "cost-model", "local"),
        (Some(40), "cost-model", "h100-pcie5"),
        (Some(20), "hot-fetch", "h100-pcie5"),
    ] {
        let c = StoreConfig {
            device_bytes: slots.map(|s| s * EXPERT_F32),
            placement: PolicySource::parse(placement),
            link: link.into(),
            device: Device::Cuda,
            ..Default::default()
        };
        let (engine, store) = Engine::open_tiered(&dir, &c).unwrap();
        // Attention, the dense MLP and every shared expert moved to the GPU too.
        let layers = engine.model.config().num_hidden_layers;
        assert_eq!(engine.model.ffns_on_gpu(), layers);
        assert_eq!(engine.model.attention_on_gpu(), layers);
        assert!(
            run(&engine) == baseline,
            "{slots:?} slots, {placement} on {link}: results differ"
        );
        let st = store.stats();
        assert_ne!(
            st.device_backend, "cpu",
            "the device tier is not on the GPU"
        );
        assert!(st.device.bytes_in > 0, "nothing reached the GPU");
        // Experts reach GPU memory through the pinned slab and the copy stream.
        let copies = st
            .gpu_transfers
            .as_ref()
            .expect("a GPU store reports its transfers");
        assert!(copies.copies > 0 && copies.bytes > 0, "{copies:?}");
        eprintln!("transfers: {copies:?}");
        eprintln!("{slots:?} {placement} {link}: {:?}", st.placement);
    }
}

/// bf16 storage of `w`'s values (truncated), shaped as the checkpoint's gate, up, down.
fn bf16_expert(w: &moehost::experts::FfnWeights, hidden: usize) -> ExpertBytes {
    let i = w.intermediate;
    let t = |name: &str, v: &[f32], shape: [usize; 2]| OwnedTensor {
        name: name.into(),
        dtype: safetensors::Dtype::BF16,
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect(),
        scales: None,
    };
    let (gate_up, down) = (w.gate_up.to_f32(), w.down.to_f32());
    ExpertBytes::new(
        [
            t("gate", &gate_up[..i * hidden], [i, hidden]),
            t("up", &gate_up[i * hidden..], [i, hidden]),
            t("down", &down, [hidden, i]),
        ],
        None,
    )
}

#[test]
fn experts_loaded_through_the_pool_give_the_cpus_bits() {
    let Some(g) = device_or_skip() else { return };
    let dir = support::fp8_model();
    let cfg = moehost::ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, cfg.fp8_block).unwrap();
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let pool = Arc::new(GpuPool::new(&g, 3 * h * i * 4, 3, 2).unwrap());
    let fp8 = ExpertBytes::read(&ckpt, 3, 11).unwrap();
    let cpu = fp8.to_ffn().unwrap();
    let bf16 = bf16_expert(&cpu, h);
    let bf16_cpu = bf16.to_ffn().unwrap();
    let key = |e| ExpertKey {
        layer: 0,
        expert: e,
    };
    // FP8 and bf16 converted on the GPU, f32 copied as is: three slots.
    let loaded = [
        (pool.load(key(0), ExpertSource::Stored(&fp8)).unwrap(), &cpu),
        (
            pool.load(key(1), ExpertSource::Stored(&bf16)).unwrap(),
            &bf16_cpu,
        ),
        (
            pool.load(key(2), ExpertSource::Compute(&cpu)).unwrap(),
            &cpu,
        ),
    ];
    for (n, (on_gpu, reference)) in loaded.iter().enumerate() {
        let on_gpu = on_gpu.as_ref().expect("a free slot");
        support::assert_same_bits(
            &[1, 5, 64],
            [h, h],
            n as u32,
            |x, out| reference.forward(x, h, out),
            |x, out| on_gpu.forward(x, h, out).unwrap(),
            &format!("source {n}"),
        );
    }
    // The pool is full until an expert is dropped.
    assert!(pool
        .load(key(3), ExpertSource::Compute(&cpu))
        .unwrap()
        .is_none());
    drop(loaded);
    assert!(pool
        .load(key(3), ExpertSource::Compute(&cpu))
        .unwrap()
        .is_some());
    let st = pool.stats();
    assert_eq!(st.copies, 4, "{st:?}");
    // FP8 and bf16 cross the link in their storage format: less than their f32 slots.
    let f32_bytes = (3 * h * i * 4) as u64;
    assert!(st.bytes < 4 * f32_bytes - f32_bytes / 2, "{st:?}");
}
