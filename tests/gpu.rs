//! The GPU suite (`--features cuda`): routed experts computed on the GPU give the CPU's bits,
//! and a generation whose device tier lives on the GPU equals the all-resident CPU run. Each
//! test runs where a CUDA driver and device are present and says why it skipped elsewhere.
#![cfg(feature = "cuda")]

mod support;

use moehost::experts::tiered::{Device, StoreConfig};
use moehost::experts::{ExpertBytes, OwnedTensor};
use moehost::gpu::{gpu, ExpertSource, GpuExpert, GpuMatrix, GpuPool};
use moehost::kernels::{grouped_rows, linear};
use moehost::model::sampling::argmax;
use moehost::policy::ExpertKey;
use moehost::policy::PolicySource;
use moehost::weights::checkpoint::Checkpoint;
use moehost::weights::format::WeightFormat;
use moehost::weights::scales::{ScaleType, Scales};
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

/// The GPU and the FP8 tiny-k2's config and checkpoint; `None` without a GPU.
fn gpu_and_fp8_model() -> Option<(Arc<moehost::gpu::Gpu>, moehost::ModelConfig, Checkpoint)> {
    let g = device_or_skip()?;
    let dir = support::fp8_model();
    let cfg = moehost::ModelConfig::from_dir(&dir).unwrap();
    let ckpt = Checkpoint::open(&dir, cfg.quantization()).unwrap();
    Some((g, cfg, ckpt))
}

#[test]
fn experts_on_the_gpu_give_the_cpus_bits() {
    let Some((g, cfg, ckpt)) = gpu_and_fp8_model() else {
        return;
    };
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
    let Some((g, cfg, ckpt)) = gpu_and_fp8_model() else {
        return;
    };
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
    for (slots, placement, link, scores) in [
        (None, "cost-model", "local", None),
        (Some(30), "cost-model", "h100-pcie5", None),
        (Some(20), "hot-fetch", "h100-pcie5", None),
        // Scores for only a few tokens at a time: attention runs in chunks of the prompt.
        (None, "cost-model", "local", Some(3 * 4 * 100)),
    ] {
        let c = StoreConfig {
            device_bytes: slots.map(|s| s * 3 * 256 * 64 * 4),
            placement: PolicySource::parse(placement),
            link: link.into(),
            device: Device::Cuda,
            ..Default::default()
        };
        let (mut engine, _store) = Engine::open_tiered(&dir, &c).unwrap();
        if let Some(floats) = scores {
            engine.model.set_gpu_attention_scores_max(floats);
        }
        let gpu = logits(&engine);
        let worst = cpu
            .iter()
            .zip(&gpu)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(
            worst < 1e-3,
            "{slots:?} {placement} {link} {scores:?}: off the CPU by {worst}"
        );
        match &first {
            None => first = Some(gpu),
            Some(f) => assert!(
                support::bits(f) == support::bits(&gpu),
                "{slots:?} slots, {placement} on {link}, {scores:?} scores: results differ from the first GPU run"
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
        // The experts stay FP8 in GPU memory: a budget of `s` f32 experts holds over 3x as many.
        if let Some(s) = slots {
            assert!(st.device.slots >= 3 * s, "{} slots", st.device.slots);
        }
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
    stored_expert(w, hidden, |name, v, shape| OwnedTensor {
        name: name.into(),
        dtype: safetensors::Dtype::BF16,
        shape: shape.to_vec(),
        bytes: v
            .iter()
            .flat_map(|x| ((x.to_bits() >> 16) as u16).to_le_bytes())
            .collect::<Vec<u8>>()
            .into(),
        scales: None,
    })
}

/// `w`'s gate, up and down, each stored by `tensor(name, values, [rows, cols])`.
fn stored_expert(
    w: &moehost::experts::FfnWeights,
    hidden: usize,
    tensor: impl Fn(&str, &[f32], [usize; 2]) -> OwnedTensor,
) -> ExpertBytes {
    let i = w.intermediate;
    let (gate_up, down) = (w.gate_up.to_f32(), w.down.to_f32());
    ExpertBytes::new(
        [
            tensor("gate", &gate_up[..i * hidden], [i, hidden]),
            tensor("up", &gate_up[i * hidden..], [i, hidden]),
            tensor("down", &down, [hidden, i]),
        ],
        None,
    )
}

#[test]
fn experts_loaded_through_the_pool_give_the_cpus_bits() {
    let Some((g, cfg, ckpt)) = gpu_and_fp8_model() else {
        return;
    };
    let (h, i) = (cfg.hidden_size, cfg.moe_intermediate_size);
    let pool = Arc::new(GpuPool::new(&g, 3 * h * i * 4, 5, 2).unwrap());
    let fp8 = ExpertBytes::read(&ckpt, 3, 11).unwrap();
    let cpu = fp8.to_ffn().unwrap();
    let bf16 = bf16_expert(&cpu, h);
    let bf16_cpu = bf16.to_ffn().unwrap();
    let int8 = quantized_expert(&cpu, h, moehost::weights::quant::Bits::Int8);
    let int8_cpu = int8.to_ffn().unwrap();
    let int4 = quantized_expert(&cpu, h, moehost::weights::quant::Bits::Int4);
    let int4_cpu = int4.to_ffn().unwrap();
    let key = |e| ExpertKey {
        layer: 0,
        expert: e,
    };
    // Every format stays as stored in its slot, f32 (the compute form) included: five slots.
    let loaded = [
        (ExpertSource::Stored(&fp8), &cpu, WeightFormat::Fp8),
        (ExpertSource::Stored(&bf16), &bf16_cpu, WeightFormat::Bf16),
        (ExpertSource::Stored(&int8), &int8_cpu, WeightFormat::Int8),
        (ExpertSource::Stored(&int4), &int4_cpu, WeightFormat::Int4),
        (ExpertSource::Compute(&cpu), &cpu, WeightFormat::F32),
    ]
    .into_iter()
    .enumerate()
    .map(|(n, (src, reference, format))| {
        let on_gpu = pool.load(key(n as u32), src).unwrap().expect("a free slot");
        assert_eq!(on_gpu.formats(), [format; 2]);
        support::assert_same_bits(
            &[1, 5, 64, 65],
            [h, h],
            n as u32,
            |x, out| reference.forward(x, h, out),
            |x, out| on_gpu.forward(x, h, out).unwrap(),
            &format!("{format:?}"),
        );
        on_gpu
    })
    .collect::<Vec<_>>();
    // FP8 in device memory: a quarter of its f32 form and scales.
    assert!(loaded[0].device_bytes() < 3 * h * i + 3 * h * i / 8);
    // The pool is full until an expert is dropped.
    assert!(pool
        .load(key(5), ExpertSource::Stored(&fp8))
        .unwrap()
        .is_none());
    drop(loaded);
    assert!(pool
        .load(key(5), ExpertSource::Stored(&fp8))
        .unwrap()
        .is_some());
    let st = pool.stats();
    assert_eq!(st.copies, 6, "{st:?}");
    // Six experts cross the link in less than three f32 experts' bytes: FP8, bf16, int8 and
    // int4 travel in their storage format.
    let f32_bytes = (3 * h * i * 4) as u64;
    assert!(st.bytes < 3 * f32_bytes, "{st:?}");
}

/// `w`'s values quantized to moehost's int8 or int4 format, shaped as gate, up, down.
fn quantized_expert(
    w: &moehost::experts::FfnWeights,
    hidden: usize,
    bits: moehost::weights::quant::Bits,
) -> ExpertBytes {
    stored_expert(w, hidden, |name, v, [rows, cols]| {
        let (bytes, scale_bytes) = moehost::weights::quant::quantize(v, rows, cols, bits);
        OwnedTensor {
            name: name.into(),
            dtype: bits.dtype(),
            shape: moehost::weights::format::stored_shape(bits.dtype(), &[rows, cols]),
            bytes: bytes.into(),
            scales: Some(f16_scales(scale_bytes)),
        }
    })
}

/// Little-endian f16 scale bytes, as moehost's int checkpoints store them.
fn f16_scales(bytes: Vec<u8>) -> Scales {
    Scales {
        ty: ScaleType::F16,
        bytes: bytes.into(),
    }
}

/// A stored tensor `[n, k]` of `dtype` with pseudo-random contents: FP8 (finite codes, block
/// scales), int8/int4 (group scales), bf16 or f32.
fn synthetic(dtype: safetensors::Dtype, n: usize, k: usize, block: [usize; 2]) -> OwnedTensor {
    let mut state = 0x9e37_79b9_u32 ^ (n * 31 + k) as u32;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        state
    };
    let values: Vec<f32> = (0..n * k)
        .map(|_| (next() % 20_001) as f32 / 10_000.0 - 1.0)
        .collect();
    let (bytes, scales) = match dtype {
        safetensors::Dtype::F8_E4M3 => {
            // Any byte but the two NaN codes; one scale per [128, 128] block.
            let bytes = (0..n * k)
                .map(|_| match next() as u8 {
                    0x7f => 0x7e,
                    0xff => 0xfe,
                    b => b,
                })
                .collect();
            let blocks = n.div_ceil(block[0]) * k.div_ceil(block[1]);
            let scales: Vec<f32> = (0..blocks)
                .map(|_| (1 + next() % 997) as f32 / 3_000.0)
                .collect();
            (bytes, Some(Scales::from_f32(&scales)))
        }
        safetensors::Dtype::I8 | safetensors::Dtype::U8 => {
            let bits = if dtype == safetensors::Dtype::I8 {
                moehost::weights::quant::Bits::Int8
            } else {
                moehost::weights::quant::Bits::Int4
            };
            let (bytes, scale_bytes) = moehost::weights::quant::quantize(&values, n, k, bits);
            (bytes, Some(f16_scales(scale_bytes)))
        }
        safetensors::Dtype::BF16 => (
            values
                .iter()
                .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                .collect(),
            None,
        ),
        _ => (values.iter().flat_map(|v| v.to_le_bytes()).collect(), None),
    };
    OwnedTensor {
        name: format!("synthetic.{dtype:?}"),
        dtype,
        shape: moehost::weights::format::stored_shape(dtype, &[n, k]),
        bytes: bytes.into(),
        scales,
    }
}

/// Every storage format the kernels read, at shapes whose rows fill no whole block of warps
/// and whose columns end in every tail the CPU's order has (32-wide chunks, 8-wide steps,
/// single elements), and at token counts across the kernel's 8-token tiles: the GPU decodes
/// each weight as the CPU does and gives the CPU's bits.
#[test]
fn every_storage_format_gives_the_cpus_bits() {
    let Some(g) = device_or_skip() else { return };
    use safetensors::Dtype;
    let block = [128, 128];
    let formats = [
        (Dtype::F32, WeightFormat::F32),
        (Dtype::BF16, WeightFormat::Bf16),
        (Dtype::F8_E4M3, WeightFormat::Fp8),
        (Dtype::I8, WeightFormat::Int8),
        (Dtype::U8, WeightFormat::Int4),
    ];
    for (dtype, format) in formats {
        for (n, k) in [(13, 77), (200, 300), (8, 7), (130, 129)] {
            // int4 packs two columns a byte: its logical width is even.
            let k = if dtype == Dtype::U8 { k + k % 2 } else { k };
            let t = synthetic(dtype, n, k, block);
            let w = t.decode_rows(0, n, Some(block)).unwrap();
            let on_gpu = GpuMatrix::upload_stored(&g, &t, k, Some(block))
                .unwrap()
                .expect("a kernel reads this format");
            assert_eq!(on_gpu.format(), format);
            support::assert_same_bits(
                &[1, 2, 8, 9, 17, 64],
                [k, n],
                n as u32,
                |x, out| linear(x, &w, k, out),
                |x, out| on_gpu.forward(x, k, out).unwrap(),
                &format!("{dtype:?} [{n}, {k}]"),
            );
        }
    }
    // F16 has no kernel: it is decoded on the CPU first.
    let f16 = OwnedTensor {
        dtype: Dtype::F16,
        ..synthetic(Dtype::BF16, 4, 8, block)
    };
    assert!(GpuMatrix::upload_stored(&g, &f16, 8, None)
        .unwrap()
        .is_none());
}

/// Attention's projections go to the GPU as the checkpoint stores them (FP8: a quarter of the
/// f32 bytes) and give the bits of the CPU's f32 decode.
#[test]
fn stored_attention_projections_give_the_cpus_bits() {
    let Some((g, cfg, ckpt)) = gpu_and_fp8_model() else {
        return;
    };
    let (h, nh, v) = (cfg.hidden_size, cfg.num_attention_heads, cfg.v_head_dim);
    let name = "model.layers.5.self_attn.o_proj.weight";
    let o = ckpt.read_f32(name, &[h, nh * v]).unwrap();
    let stored = OwnedTensor::read(&ckpt, name).unwrap();
    let on_gpu = GpuMatrix::upload_stored(&g, &stored, nh * v, ckpt.fp8_block())
        .unwrap()
        .expect("FP8 has a kernel");
    assert_eq!(on_gpu.format(), WeightFormat::Fp8);
    assert!(on_gpu.device_bytes() < o.len() * 4 / 3, "kept as FP8");
    support::assert_same_bits(
        &[1, 2, 7, 64],
        [nh * v, h],
        5,
        |x, out| linear(x, &o, nh * v, out),
        |x, out| on_gpu.forward(x, nh * v, out).unwrap(),
        "stored o_proj",
    );
}

/// A MoE layer step's experts run together (`forward_experts`: one grouped launch per
/// projection and format, one host round trip in all), each with its own token count, and
/// every one gives the CPU's bits: FP8 experts through the pool, bf16 and int8 ones uploaded,
/// a whole group with no tokens before two groups that have some, and one expert above
/// `ROW_INVARIANT_MAX` rows (computed on the CPU from its GPU copy).
#[test]
fn a_layer_steps_experts_run_together_with_the_cpus_bits() {
    let Some((g, cfg, ckpt)) = gpu_and_fp8_model() else {
        return;
    };
    let h = cfg.hidden_size;
    let stored: Vec<ExpertBytes> = (0..4)
        .map(|e| ExpertBytes::read(&ckpt, 2, e * 11).unwrap())
        .collect();
    let cpu: Vec<_> = stored.iter().map(|b| b.to_ffn().unwrap()).collect();
    let pool = Arc::new(GpuPool::new(&g, 3 * h * 64 * 4, 4, 2).unwrap());
    let mut uploaded = Vec::new();
    let mut references = Vec::new();
    // Two bf16 experts (the group without tokens), then the FP8 ones, then two int8 ones.
    for w in &cpu[..2] {
        let b = bf16_expert(w, h);
        uploaded.push(GpuExpert::upload_stored(&g, &b).unwrap());
        references.push(b.to_ffn().unwrap());
    }
    for (n, b) in stored.iter().enumerate() {
        let key = ExpertKey {
            layer: 2,
            expert: n as u32,
        };
        uploaded.push(pool.load(key, ExpertSource::Stored(b)).unwrap().unwrap());
        references.push(b.to_ffn().unwrap());
    }
    for w in &cpu[2..] {
        let b = quantized_expert(w, h, moehost::weights::quant::Bits::Int8);
        uploaded.push(GpuExpert::upload_stored(&g, &b).unwrap());
        references.push(b.to_ffn().unwrap());
    }
    let on_gpu = uploaded;
    let tokens = [0, 0, 1, 3, 0, 70, 9, 2];
    let inputs: Vec<Vec<f32>> = tokens
        .iter()
        .enumerate()
        .map(|(n, &t)| support::expert_input(t, h, n as u32))
        .collect();
    let jobs: Vec<_> = on_gpu
        .iter()
        .zip(&inputs)
        .map(|(e, x)| (e, &x[..]))
        .collect();
    let together = moehost::gpu::forward_experts(&jobs, h).unwrap();
    for (n, (reference, x)) in references.iter().zip(&inputs).enumerate() {
        let mut want = vec![0f32; x.len()];
        reference.forward(x, h, &mut want);
        assert!(
            support::bits(&want) == support::bits(&together[n]),
            "expert {n} ({} tokens)",
            tokens[n]
        );
    }
}

/// The FP8 model all-resident on the CPU, and on the GPU with attention there (and the store
/// that serves its experts); `None` without a GPU.
fn cpu_and_gpu_engines() -> Option<(Engine, Engine, impl Sized)> {
    device_or_skip()?;
    let dir = support::fp8_model();
    let cpu = Engine::open(&dir).unwrap();
    let c = StoreConfig {
        device: Device::Cuda,
        ..Default::default()
    };
    let (gpu, store) = Engine::open_tiered(&dir, &c).unwrap();
    assert_eq!(
        gpu.model.attention_on_gpu(),
        gpu.model.config().num_hidden_layers
    );
    Some((cpu, gpu, store))
}

/// Sequences in one batched pass on the GPU (their attention projections run once over every
/// sequence's rows) give the bits each gives alone on the CPU: prompts of different lengths
/// prefilled together, then greedy decode steps together.
#[test]
fn batched_steps_on_the_gpu_equal_each_sequence_alone_on_the_cpu() {
    let Some((cpu, gpu, _store)) = cpu_and_gpu_engines() else {
        return;
    };
    let prompts: Vec<Vec<u32>> = [
        "<|bos|>The software is distributed",
        "<|bos|>In the beginning",
        "<|bos|>A quick brown fox jumps over the lazy dog and",
        "<|bos|>Once",
    ]
    .iter()
    .map(|p| gpu.encode(p).unwrap())
    .collect();
    let steps = 8;
    // Alone on the CPU: the prefill's last logits, then each decode step's.
    let alone: Vec<Vec<Vec<u32>>> = prompts
        .iter()
        .map(|ids| {
            let model = &cpu.model;
            let mut cache = model.new_cache();
            let mut logits = model
                .forward(ids, &mut cache, Logits::Last, false)
                .unwrap()
                .logits;
            let mut all = vec![support::bits(&logits)];
            for _ in 0..steps {
                let next = argmax(&logits);
                logits = model
                    .forward(&[next], &mut cache, Logits::Last, false)
                    .unwrap()
                    .logits;
                all.push(support::bits(&logits));
            }
            all
        })
        .collect();
    // Together on the GPU: one pass prefills every prompt, then one pass per decode step.
    let model = &gpu.model;
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut inputs: Vec<Vec<u32>> = prompts.clone();
    #[allow(clippy::needless_range_loop)] // `step` indexes every sequence's history
    for step in 0..=steps {
        let out = support::forward_batch(model, &inputs, &mut caches);
        for (s, logits) in out.iter().enumerate() {
            assert!(
                support::bits(logits) == alone[s][step],
                "sequence {s} step {step}: the GPU's batched logits differ from the CPU alone"
            );
            inputs[s] = vec![argmax(logits)];
        }
    }
}

/// With attention on the GPU its cache lives in device memory: a decode long enough to grow
/// that cache twice, then a prefix reused after `truncate` with a new continuation, give the
/// CPU's bits at every step.
#[test]
fn attention_on_the_gpu_keeps_the_cpus_bits_over_a_growing_device_cache() {
    let Some((cpu, gpu, _store)) = cpu_and_gpu_engines() else {
        return;
    };
    let prompt = gpu.encode("<|bos|>In the beginning").unwrap();
    let (mut on_cpu, mut on_gpu) = (cpu.model.new_cache(), gpu.model.new_cache());
    let step = |ids: &[u32], c: &mut moehost::KvCache, g: &mut moehost::KvCache, at: &str| {
        let a = cpu
            .model
            .forward(ids, c, Logits::All, false)
            .unwrap()
            .logits;
        let b = gpu
            .model
            .forward(ids, g, Logits::All, false)
            .unwrap()
            .logits;
        assert!(
            support::bits(&a) == support::bits(&b),
            "{at}: the GPU's logits differ from the CPU's"
        );
        argmax(&b[b.len() - a.len() / ids.len()..])
    };
    let mut next = step(&prompt, &mut on_cpu, &mut on_gpu, "prefill");
    let first = on_gpu.device_bytes();
    assert!(first > 0, "the cache is not in GPU memory");
    assert_eq!(on_cpu.device_bytes(), 0);
    // Past 64 and 128 positions: the device cache is reallocated and its rows carried over.
    while on_gpu.len() < 140 {
        let at = format!("position {}", on_gpu.len());
        next = step(&[next], &mut on_cpu, &mut on_gpu, &at);
    }
    assert!(
        on_gpu.device_bytes() >= 2 * first,
        "the device cache did not grow"
    );
    let cfg = gpu.model.config();
    on_cpu.truncate(prompt.len() + 3, cfg);
    on_gpu.truncate(prompt.len() + 3, cfg);
    let other = gpu.encode(" and then there was light").unwrap();
    let mut next = step(&other, &mut on_cpu, &mut on_gpu, "after truncate");
    for i in 0..4 {
        next = step(
            &[next],
            &mut on_cpu,
            &mut on_gpu,
            &format!("decode {i} after truncate"),
        );
    }
}
