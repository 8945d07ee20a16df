//! Routed experts computed on the GPU (feature `cuda`), bit for bit what the CPU computes.
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
//! Does not own: which experts live on the device (`store`), attention and dense layers (still
//! on the CPU).

use anyhow::{anyhow, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::experts::FfnWeights;
use crate::kernels::{swiglu, ROW_INVARIANT_MAX};
use crate::policy::ExpertKey;
use crate::transfer::cuda::CudaCopyEngine;
use crate::transfer::{CopyEngine, Pinned, TransferScheduler, DEMAND};

/// The kernel, compiled from `rows_dot.cu` by `nvcc -ptx -arch=compute_80` (CUDA 13.0).
const ROWS_DOT_PTX: &str = include_str!("rows_dot.ptx");
const BLOCK: u32 = 128;

/// One CUDA device with the expert kernel loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    rows_dot: CudaFunction,
    /// Expert calls come from the MoE's worker threads; one at a time keeps the stream simple.
    lock: Mutex<()>,
    pub name: String,
}

/// Device 0, found and set up once per process.
pub fn gpu() -> Result<Arc<Gpu>, String> {
    static GPU: OnceLock<Result<Arc<Gpu>, String>> = OnceLock::new();
    GPU.get_or_init(|| {
        let (ctx, info) = crate::transfer::cuda::probe()?;
        let setup = || -> Result<Gpu> {
            let stream = ctx.new_stream()?;
            let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ROWS_DOT_PTX))?;
            let rows_dot = module.load_function("rows_dot")?;
            Ok(Gpu {
                ctx: ctx.clone(),
                stream,
                rows_dot,
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

/// The device tier's expert memory: slots filled through pinned staging and the copy stream.
pub struct GpuPool {
    gpu: Arc<Gpu>,
    sched: TransferScheduler<CudaCopyEngine>,
    /// Pinned staging slots not in use (a slot is held from staging until its copy completed).
    staging: Mutex<Vec<usize>>,
    staged: Condvar,
}

impl GpuPool {
    /// `device_slots` experts of `slot_bytes` in device memory, `staging` pinned host slots.
    pub fn new(
        gpu: &Arc<Gpu>,
        slot_bytes: usize,
        device_slots: usize,
        staging: usize,
    ) -> Result<Self> {
        let engine = CudaCopyEngine::new(gpu.ctx.clone(), slot_bytes, staging, device_slots, true)?;
        Ok(Self {
            gpu: gpu.clone(),
            sched: TransferScheduler::new(engine, 2),
            staging: Mutex::new((0..staging).collect()),
            staged: Condvar::new(),
        })
    }

    /// Copies `w` (compute form) into a device slot for `key`: staged in a pinned slot, copied on
    /// the copy stream, waited for (this copy only). `None` when no device slot is free.
    pub fn load(self: &Arc<Self>, key: ExpertKey, w: &FfnWeights) -> Result<Option<GpuExpert>> {
        if self.sched.is_resident(key) {
            // The store keeps one copy per expert; never share a slot between two owners.
            return Ok(None);
        }
        let host_slot = {
            let mut free = self.staging.lock().unwrap();
            loop {
                if let Some(h) = free.pop() {
                    break h;
                }
                free = self.staged.wait(free).unwrap();
            }
        };
        let result = (|| -> Result<Option<GpuExpert>> {
            let parts = [as_bytes(&w.gate_up), as_bytes(&w.down)];
            self.sched.engine().stage(host_slot, &parts)?;
            if !self.sched.prefetch(key, host_slot, DEMAND)? {
                return Ok(None);
            }
            let pin = self.sched.demand(key, host_slot)?;
            let base = self.sched.engine().device_ptr(pin.slot);
            Ok(Some(GpuExpert {
                gpu: self.gpu.clone(),
                weights: Weights::Pooled {
                    pool: self.clone(),
                    key,
                    pin: Some(pin),
                    gate_up: base,
                    down: base + (w.gate_up.len() * 4) as u64,
                },
                gate_up_len: w.gate_up.len(),
                down_len: w.down.len(),
                intermediate: w.intermediate,
                hidden: w.down.len() / w.intermediate.max(1),
            }))
        })();
        self.staging.lock().unwrap().push(host_slot);
        self.staged.notify_one();
        result
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
        key: ExpertKey,
        pin: Option<Pinned<CudaCopyEngine>>,
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
    gate_up_len: usize,
    down_len: usize,
    intermediate: usize,
    hidden: usize,
}

impl Drop for GpuExpert {
    fn drop(&mut self) {
        if let Weights::Pooled { pool, key, pin, .. } = &mut self.weights {
            drop(pin.take());
            pool.sched.evict(*key);
        }
    }
}

impl GpuExpert {
    /// Copies `w` into allocations of its own (synchronously, from pageable memory).
    pub fn upload(gpu: &Arc<Gpu>, w: &FfnWeights) -> Result<Self> {
        let _one = gpu.lock.lock().unwrap();
        let gate_up = gpu.stream.clone_htod(&w.gate_up)?;
        let down = gpu.stream.clone_htod(&w.down)?;
        gpu.stream.synchronize()?;
        Ok(Self {
            gpu: gpu.clone(),
            weights: Weights::Owned { gate_up, down },
            gate_up_len: w.gate_up.len(),
            down_len: w.down.len(),
            intermediate: w.intermediate,
            hidden: w.down.len() / w.intermediate.max(1),
        })
    }

    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        (self.gate_up_len + self.down_len) * 4
    }

    /// `FfnWeights::forward`, on the GPU, with the same bits. Above `ROW_INVARIANT_MAX` rows
    /// the CPU's kernels switch to a blocked GEMM whose sums no row kernel reproduces, so such
    /// a step copies the weights back and runs on the CPU.
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) -> Result<()> {
        anyhow::ensure!(
            hidden == self.hidden,
            "hidden size {hidden}, expert has {}",
            self.hidden
        );
        let t = x.len() / hidden;
        let i = self.intermediate;
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
        let s = &self.gpu.stream;
        let t = x.len() / k;
        let xd = s.clone_htod(x)?;
        let mut out = s.alloc_zeros::<f32>(t * n)?;
        let (n32, k32, t32) = (n as i32, k as i32, t as i32);
        let cfg = LaunchConfig {
            grid_dim: ((n as u32).div_ceil(BLOCK), t as u32, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = s.launch_builder(&self.gpu.rows_dot);
        // A pooled slot's copy completed before the expert was handed out (`GpuPool::load`).
        match (&self.weights, which) {
            (Weights::Owned { gate_up, .. }, Matrix::GateUp) => launch.arg(gate_up),
            (Weights::Owned { down, .. }, Matrix::Down) => launch.arg(down),
            (Weights::Pooled { gate_up, .. }, Matrix::GateUp) => launch.arg(gate_up),
            (Weights::Pooled { down, .. }, Matrix::Down) => launch.arg(down),
        };
        launch.arg(&xd).arg(&mut out).arg(&n32).arg(&k32).arg(&t32);
        // SAFETY: the kernel reads n*k and t*k floats and writes t*n, the sizes allocated.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("rows_dot launch: {e}"))?;
        Ok(s.clone_dtoh(&out)?)
    }

    fn download(&self) -> Result<FfnWeights> {
        let _one = self.gpu.lock.lock().unwrap();
        let (gate_up, down) = match &self.weights {
            Weights::Owned { gate_up, down } => (
                self.gpu.stream.clone_dtoh(gate_up)?,
                self.gpu.stream.clone_dtoh(down)?,
            ),
            Weights::Pooled { gate_up, down, .. } => {
                let mut g = vec![0f32; self.gate_up_len];
                let mut d = vec![0f32; self.down_len];
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
            gate_up,
            down,
            intermediate: self.intermediate,
        })
    }
}
