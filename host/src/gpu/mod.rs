//! Experts and attention projections computed on the GPU (feature `cuda`), bit for bit what the CPU computes.
//!
//! Owns: the process's CUDA device for expert compute (found once; `None`, with the reason, when
//! there is no driver or device), `GpuExpert` (an expert's compute-form weights in device
//! memory, `cuMemAlloc`, never managed memory) and its forward pass: both projections run the
//! `rows_dot` kernel (`rows_dot.cu`, checked in as PTX and JIT-compiled by the driver), which
//! sums each dot product in exactly the order of the CPU's `kernels::dot`; the SwiGLU between
//! them runs on the CPU, whose `exp` the GPU's would not match bit for bit. So an expert gives
//! the same bits on either side and placement never changes a token.
//! `GpuPool` is the device tier's memory: one `cuMemAlloc` pool of expert slots filled by the
//! transfer scheduler (`transfer::TransferScheduler` over `CudaCopyEngine`): an expert's compute
//! form is staged in a pinned host slot and copied on the dedicated copy stream, and compute
//! waits for that expert's copy only. A pooled expert frees its slot when dropped.
//! `GpuMatrix` holds attention's projections (and MLA's per-head W_UK^T, W_UV) for the same
//! kernel; attention's scores, softmax, RoPE and norms, and the KV cache, stay on the CPU.
//! Does not own: which experts live on the device (`store`), which weights move (`deepseek_v3`).

use anyhow::{anyhow, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::experts::{ExpertBytes, FfnWeights};
use crate::kernels::{self, swiglu, ROW_INVARIANT_MAX};
use crate::policy::ExpertKey;
use crate::transfer::cuda::CudaCopyEngine;
use crate::transfer::{CopyEngine, TransferScheduler};
use std::borrow::Cow;

/// The kernels (`rows_dot`, `dequant_fp8`, `dequant_bf16`), compiled from `rows_dot.cu` by
/// `nvcc -ptx -arch=compute_80` (CUDA 13.0).
const ROWS_DOT_PTX: &str = include_str!("rows_dot.ptx");
const BLOCK: u32 = 128;

/// One CUDA device with the expert kernel loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rows_dot: CudaFunction,
    dequant_fp8: CudaFunction,
    dequant_bf16: CudaFunction,
    /// Expert calls come from the MoE's worker threads; one at a time keeps the stream simple.
    lock: Mutex<()>,
    pub name: String,
}

impl Gpu {
    /// `out [t, groups, n]` with `out[t, g, r] = dot(w[g][r, :], x[t, g, ..k])` for the
    /// matrices `w [groups, n, k]` at device address `w` and `x [t, groups, x_stride]`: the
    /// `rows_dot` kernel, result back on the host. The caller holds `self.lock`.
    fn rows_dot(
        &self,
        w: u64,
        [groups, n, k]: [usize; 3],
        x: &[f32],
        x_stride: usize,
    ) -> Result<Vec<f32>> {
        let s = &self.stream;
        let t = x.len() / (groups * x_stride);
        anyhow::ensure!(
            t * groups * x_stride == x.len() && k <= x_stride && t < 1 << 16,
            "rows_dot: {} inputs are not [tokens < 65536, {groups}, {x_stride}]",
            x.len()
        );
        let xd = s.clone_htod(x)?;
        let mut out = s.alloc_zeros::<f32>(t * groups * n)?;
        let ints = [n, k, t, groups, x_stride].map(|v| v as i32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(BLOCK), t as u32, groups as u32),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.rows_dot);
        launch.arg(&w).arg(&xd).arg(&mut out);
        for v in &ints {
            launch.arg(v);
        }
        // SAFETY: the kernel reads groups*n*k weights (the caller's matrices) and the t*groups
        // x_stride-wide inputs allocated above, and writes the t*groups*n outputs allocated above.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("rows_dot launch: {e}"))?;
        Ok(s.clone_dtoh(&out)?)
    }
}

/// A linear layer's weight `[n, k]`, or `groups` of them (MLA's per-head W_UK^T and W_UV), in
/// device memory: attention's projections on the GPU. Computed with `rows_dot` at every token
/// count, so up to `ROW_INVARIANT_MAX` tokens it gives the CPU's bits; above, where the CPU
/// switches to a blocked GEMM, it gives the row kernel's (deterministic, and the same whatever
/// the expert policies and budgets: the invariant holds per backend).
pub struct GpuMatrix {
    gpu: Arc<Gpu>,
    w: CudaSlice<f32>,
    groups: usize,
    n: usize,
    k: usize,
}

impl GpuMatrix {
    /// Copies `w [groups, n, k]` into device memory.
    pub fn upload(gpu: &Arc<Gpu>, w: &[f32], groups: usize, k: usize) -> Result<Self> {
        let n = w.len() / (groups * k).max(1);
        anyhow::ensure!(
            groups * n * k == w.len(),
            "{} weights are not {groups} x [n, {k}]",
            w.len()
        );
        let _one = gpu.lock.lock().unwrap();
        let d = gpu.stream.clone_htod(w)?;
        gpu.stream.synchronize()?;
        Ok(Self {
            gpu: gpu.clone(),
            w: d,
            groups,
            n,
            k,
        })
    }

    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        self.groups * self.n * self.k * 4
    }

    /// `out [t, groups, n]` = each group's matrix times `x [t, groups, x_stride]`'s first `k`.
    pub fn forward(&self, x: &[f32], x_stride: usize, out: &mut [f32]) -> Result<()> {
        let _one = self.gpu.lock.lock().unwrap();
        let w = self.w.device_ptr(&self.gpu.stream).0;
        let y = self
            .gpu
            .rows_dot(w, [self.groups, self.n, self.k], x, x_stride)?;
        anyhow::ensure!(
            y.len() == out.len(),
            "output of {} for {}",
            out.len(),
            y.len()
        );
        out.copy_from_slice(&y);
        Ok(())
    }
}

/// Device 0, found and set up once per process.
pub fn gpu() -> Result<Arc<Gpu>, String> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    GPU.get_or_init(|| {
        let (ctx, info) = crate::transfer::cuda::probe()?;
        let setup = || -> Result<Gpu> {
            let stream = ctx.new_stream()?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ROWS_DOT_PTX))?;
            Ok(Gpu {
                ctx: ctx.clone(),
                stream,
                rows_dot: module.load_function("rows_dot")?,
                dequant_fp8: module.load_function("dequant_fp8")?,
                dequant_bf16: module.load_function("dequant_bf16")?,
                lock: Mutex::new(()),
                name: info.name.clone(),
            })
        };
        setup()
            .map(Arc::new)
            .map_err(|e| format!("cannot set up {}: {e:#}", info.name))
    })
    .clone()
}

/// What `GpuPool::load` copies: the storage format (FP8 and bf16 are converted to f32 on the
/// GPU) or the compute form (f32, copied as is).
pub enum ExpertSource<'a> {
    Stored(&'a ExpertBytes),
    Compute(&'a FfnWeights),
}

/// An expert's sizes in compute form.
struct Dims {
    gate_up_len: usize,
    down_len: usize,
    intermediate: usize,
    hidden: usize,
}

impl ExpertSource<'_> {
    fn dims(&self) -> Dims {
        match self {
            ExpertSource::Compute(w) => Dims {
                gate_up_len: w.gate_up.len(),
                down_len: w.down.len(),
                intermediate: w.intermediate,
                hidden: w.down.len() / w.intermediate.max(1),
            },
            ExpertSource::Stored(b) => {
                let (i, h) = (b.tensors[0].rows(), b.tensors[2].rows());
                Dims {
                    gate_up_len: 2 * i * h,
                    down_len: h * i,
                    intermediate: i,
                    hidden: h,
                }
            }
        }
    }

    /// The bytes to stage: f32 gate_up then down (widened when the compute form is bf16); or
    /// the stored gate, up, down, then scales.
    fn parts(&self) -> Vec<Cow<'_, [u8]>> {
        fn f32_bytes(m: &kernels::Matrix) -> Cow<'_, [u8]> {
            match m {
                kernels::Matrix::F32(v) => Cow::Borrowed(as_bytes(v)),
                m => Cow::Owned(as_bytes(&m.to_f32()).to_vec()),
            }
        }
        match self {
            ExpertSource::Compute(w) => vec![f32_bytes(&w.gate_up), f32_bytes(&w.down)],
            ExpertSource::Stored(b) => b
                .tensors
                .iter()
                .map(|t| t.bytes.as_slice())
                .chain(
                    b.tensors
                        .iter()
                        .filter_map(|t| t.scales.as_deref())
                        .map(as_bytes),
                )
                .map(Cow::Borrowed)
                .collect(),
        }
    }
}

/// The device tier's expert memory: f32 expert slots in one `cuMemAlloc` pool, filled through
/// pinned staging slots, landing buffers and the copy stream (the transfer scheduler), then
/// converted in place on the GPU.
pub struct GpuPool {
    gpu: Arc<Gpu>,
    /// Host staging slot i -> a landing buffer in device memory (the scheduler's device slots).
    sched: TransferScheduler<CudaCopyEngine>,
    /// Pinned staging slots not in use (a slot is held from staging until its copy completed).
    staging: Mutex<Vec<usize>>,
    staged: Condvar,
    /// The expert slots: f32 gate_up then down, `slot_bytes` each.
    base: u64,
    slot_bytes: usize,
    free: Mutex<Vec<usize>>,
    /// `fp8::E4M3_TABLE` in device memory, so the GPU decodes FP8 with the CPU's values.
    e4m3: CudaSlice<f32>,
}

// SAFETY: `base` is a device address owned by the pool; every use goes through the driver.
unsafe impl Send for GpuPool {}
unsafe impl Sync for GpuPool {}

impl Drop for GpuPool {
    fn drop(&mut self) {
        let _ = self.gpu.ctx.bind_to_thread();
        // SAFETY: allocated in `new`; no expert outlives the pool (each holds an `Arc` of it).
        let _ = unsafe { cudarc::driver::result::free_sync(self.base) };
    }
}

impl GpuPool {
    /// `device_slots` experts of `slot_bytes` (their f32 compute form) in device memory, and
    /// `staging` pinned host slots with as many landing buffers.
    pub fn new(
        gpu: &Arc<Gpu>,
        slot_bytes: usize,
        device_slots: usize,
        staging: usize,
    ) -> Result<Self> {
        let engine = CudaCopyEngine::new(gpu.ctx.clone(), slot_bytes, staging, staging, true)?;
        gpu.ctx.bind_to_thread()?;
        // SAFETY: a plain device allocation, freed in Drop.
        let base = unsafe { cudarc::driver::result::malloc_sync(slot_bytes * device_slots.max(1)) }
            .map_err(|e| {
                anyhow!("cannot allocate {device_slots} expert slots of {slot_bytes} bytes: {e}")
            })?;
        let e4m3 = gpu.stream.clone_htod(&crate::fp8::E4M3_TABLE[..])?;
        Ok(Self {
            gpu: gpu.clone(),
            sched: TransferScheduler::new(engine, 2),
            staging: Mutex::new((0..staging).collect()),
            staged: Condvar::new(),
            base,
            slot_bytes,
            free: Mutex::new((0..device_slots).rev().collect()),
            e4m3,
        })
    }

    /// Puts `key` in a device slot: its bytes are staged in a pinned slot, copied on the copy
    /// stream into a landing buffer (waiting for this copy only), then converted to f32 into the
    /// slot on the GPU. `None` when no slot is free.
    pub fn load(
        self: &Arc<Self>,
        key: ExpertKey,
        src: ExpertSource<'_>,
    ) -> Result<Option<GpuExpert>> {
        let Some(slot) = self.free.lock().unwrap().pop() else {
            return Ok(None);
        };
        let expert = self.fill(key, slot, src);
        if expert.is_err() {
            self.free.lock().unwrap().push(slot);
        }
        expert.map(Some)
    }

    fn fill(
        self: &Arc<Self>,
        key: ExpertKey,
        slot: usize,
        src: ExpertSource<'_>,
    ) -> Result<GpuExpert> {
        // The GPU converts FP8 and bf16 itself; any other stored format goes as f32.
        let converted;
        let src = match src {
            ExpertSource::Stored(b) if !on_gpu(b) => {
                converted = b.to_ffn()?;
                ExpertSource::Compute(&converted)
            }
            src => src,
        };
        let dims = src.dims();
        let f32_bytes = (dims.gate_up_len + dims.down_len) * 4;
        anyhow::ensure!(
            f32_bytes <= self.slot_bytes,
            "expert {key:?} does not fit a device slot"
        );
        let parts = src.parts();
        let parts: Vec<&[u8]> = parts.iter().map(|p| p.as_ref()).collect();
        let host_slot = {
            let mut free = self.staging.lock().unwrap();
            loop {
                if let Some(h) = free.pop() {
                    break h;
                }
                free = self.staged.wait(free).unwrap();
            }
        };
        let out = self.base + (slot * self.slot_bytes) as u64;
        let landed = (|| -> Result<()> {
            // One load per expert at a time (the store guarantees it): a second would share the
            // first's landing buffer and free it under it.
            anyhow::ensure!(
                !self.sched.is_resident(key),
                "{key:?} is already being loaded"
            );
            self.sched.engine().stage(host_slot, &parts)?;
            let pin = self.sched.demand(key, host_slot)?;
            let landing = self.sched.engine().device_ptr(pin.slot);
            let convert = match src {
                ExpertSource::Stored(b) => self.convert(b, landing, out),
                ExpertSource::Compute(_) => {
                    let _one = self.gpu.lock.lock().unwrap();
                    self.gpu.ctx.bind_to_thread()?;
                    // SAFETY: both ranges lie in live device allocations of at least this size.
                    unsafe { cudarc::driver::result::memcpy_dtod_sync(out, landing, f32_bytes) }
                        .map_err(|e| anyhow!("cuMemcpyDtoD: {e}"))
                }
            };
            drop(pin);
            self.sched.evict(key);
            convert
        })();
        self.staging.lock().unwrap().push(host_slot);
        self.staged.notify_one();
        landed?;
        Ok(GpuExpert {
            gpu: self.gpu.clone(),
            weights: Weights::Pooled {
                pool: self.clone(),
                slot,
                gate_up: out,
                down: out + (dims.gate_up_len * 4) as u64,
            },
            dims,
        })
    }

    /// The stored tensors in `landing` (gate, up, down bytes, then their scales) to f32 at `out`.
    fn convert(&self, b: &ExpertBytes, landing: u64, out: u64) -> Result<()> {
        let g = &self.gpu;
        let _one = g.lock.lock().unwrap();
        let s = &g.stream;
        let mut at = landing;
        let mut scales_at = landing + b.tensors.iter().map(|t| t.bytes.len() as u64).sum::<u64>();
        let mut dst = out;
        for t in &b.tensors {
            let (rows, cols) = (t.shape[0], t.shape[1]);
            let n = rows * cols;
            let cfg = LaunchConfig {
                grid_dim: ((n as u32).div_ceil(BLOCK), 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            match t.dtype {
                safetensors::Dtype::F8_E4M3 => {
                    let [br, bc] = b.fp8_block().expect("on_gpu checked the block size");
                    let (r32, c32, br32, bc32) = (rows as i32, cols as i32, br as i32, bc as i32);
                    let mut l = s.launch_builder(&g.dequant_fp8);
                    l.arg(&at).arg(&scales_at).arg(&self.e4m3).arg(&dst);
                    l.arg(&r32).arg(&c32).arg(&br32).arg(&bc32);
                    // SAFETY: reads n bytes and the block scales, writes n floats, all in bounds.
                    unsafe { l.launch(cfg) }.map_err(|e| anyhow!("dequant_fp8: {e}"))?;
                    scales_at += (t.scales.as_ref().map_or(0, |v| v.len()) * 4) as u64;
                }
                _ => {
                    let n32 = n as i32;
                    let mut l = s.launch_builder(&g.dequant_bf16);
                    l.arg(&at).arg(&dst).arg(&n32);
                    // SAFETY: reads n bf16 values, writes n floats, all in bounds.
                    unsafe { l.launch(cfg) }.map_err(|e| anyhow!("dequant_bf16: {e}"))?;
                }
            }
            at += t.bytes.len() as u64;
            dst += (n * 4) as u64;
        }
        s.synchronize()?;
        Ok(())
    }

    /// The GPU's name.
    pub fn name(&self) -> &str {
        &self.gpu.name
    }

    /// The scheduler's counters (copies, bytes, waits).
    pub fn stats(&self) -> crate::transfer::TransferStats {
        self.sched.stats()
    }
}

/// Whether the GPU converts this storage format itself: FP8 with block scales, or bf16.
fn on_gpu(b: &ExpertBytes) -> bool {
    // The scales follow the weights in the landing buffer: they must stay 4-byte aligned.
    let weights: usize = b.tensors.iter().map(|t| t.bytes.len()).sum();
    weights.is_multiple_of(4)
        && b.tensors.iter().all(|t| {
            t.shape.len() == 2
                && match t.dtype {
                    safetensors::Dtype::F8_E4M3 => t.scales.is_some() && b.fp8_block().is_some(),
                    safetensors::Dtype::BF16 => t.scales.is_none(),
                    _ => false,
                }
        })
}

fn as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: any f32 is 4 plain bytes; the length is in bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Where an expert's weights are in device memory.
enum Weights {
    /// Its own allocations (`GpuExpert::upload`).
    Owned {
        gate_up: CudaSlice<f32>,
        down: CudaSlice<f32>,
    },
    /// A slot of a `GpuPool`, freed when the expert is dropped.
    Pooled {
        pool: Arc<GpuPool>,
        slot: usize,
        gate_up: u64,
        down: u64,
    },
}

#[derive(Clone, Copy)]
enum Matrix {
    GateUp,
    Down,
}

/// An expert's compute-form weights in device memory.
pub struct GpuExpert {
    gpu: Arc<Gpu>,
    weights: Weights,
    dims: Dims,
}

impl Drop for GpuExpert {
    fn drop(&mut self) {
        if let Weights::Pooled { pool, slot, .. } = &self.weights {
            pool.free.lock().unwrap().push(*slot);
        }
    }
}

impl GpuExpert {
    /// Copies `w` into allocations of its own (synchronously, from pageable memory).
    pub fn upload(gpu: &Arc<Gpu>, w: &FfnWeights) -> Result<Self> {
        let _one = gpu.lock.lock().unwrap();
        let gate_up = gpu.stream.clone_htod(w.gate_up.to_f32().as_ref())?;
        let down = gpu.stream.clone_htod(w.down.to_f32().as_ref())?;
        gpu.stream.synchronize()?;
        Ok(Self {
            gpu: gpu.clone(),
            weights: Weights::Owned { gate_up, down },
            dims: ExpertSource::Compute(w).dims(),
        })
    }

    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        (self.dims.gate_up_len + self.dims.down_len) * 4
    }

    /// `FfnWeights::forward`, on the GPU, with the same bits. Above `ROW_INVARIANT_MAX` rows
    /// the CPU's kernels switch to a blocked GEMM whose sums no row kernel reproduces, so such
    /// a step copies the weights back and runs on the CPU.
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) -> Result<()> {
        anyhow::ensure!(
            hidden == self.dims.hidden,
            "hidden size {hidden}, expert has {}",
            self.dims.hidden
        );
        let t = x.len() / hidden;
        let i = self.dims.intermediate;
        if t > ROW_INVARIANT_MAX {
            let w = self.download()?;
            w.forward(x, hidden, out);
            return Ok(());
        }
        let _one = self.gpu.lock.lock().unwrap();
        let gu = self.rows(Matrix::GateUp, 2 * i, hidden, x)?;
        let mut act = vec![0f32; t * i];
        swiglu(&gu, i, &mut act);
        let y = self.rows(Matrix::Down, hidden, i, &act)?;
        out.copy_from_slice(&y);
        Ok(())
    }

    /// `x [t, k] @ w^T` for `w [n, k]`, one of the expert's matrices; back on the host.
    fn rows(&self, which: Matrix, n: usize, k: usize, x: &[f32]) -> Result<Vec<f32>> {
        // A pooled slot's copy completed before the expert was handed out (`GpuPool::load`).
        let s = &self.gpu.stream;
        let w = match (&self.weights, which) {
            (Weights::Owned { gate_up, .. }, Matrix::GateUp) => gate_up.device_ptr(s).0,
            (Weights::Owned { down, .. }, Matrix::Down) => down.device_ptr(s).0,
            (Weights::Pooled { gate_up, .. }, Matrix::GateUp) => *gate_up,
            (Weights::Pooled { down, .. }, Matrix::Down) => *down,
        };
        self.gpu.rows_dot(w, [1, n, k], x, k)
    }

    fn download(&self) -> Result<FfnWeights> {
        let _one = self.gpu.lock.lock().unwrap();
        let (gate_up, down) = match &self.weights {
            Weights::Owned { gate_up, down } => (
                self.gpu.stream.clone_dtoh(gate_up)?,
                self.gpu.stream.clone_dtoh(down)?,
            ),
            Weights::Pooled { gate_up, down, .. } => {
                let mut g = vec![0f32; self.dims.gate_up_len];
                let mut d = vec![0f32; self.dims.down_len];
                self.gpu.ctx.bind_to_thread()?;
                // SAFETY: the slot holds gate_up_len then down_len floats, copied completely.
                unsafe {
                    cudarc::driver::result::memcpy_dtoh_sync(&mut g, *gate_up)?;
                    cudarc::driver::result::memcpy_dtoh_sync(&mut d, *down)?;
                }
                (g, d)
            }
        };
        Ok(FfnWeights {
            gate_up: kernels::Matrix::F32(gate_up),
            down: kernels::Matrix::F32(down),
            intermediate: self.dims.intermediate,
        })
    }
}
