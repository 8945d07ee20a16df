//! Routed experts computed on the GPU (feature `cuda`), bit for bit what the CPU computes.
//!
//! Owns: the process's CUDA device for expert compute (found once; `None`, with the reason, when
//! there is no driver or device), `GpuExpert` (an expert's compute-form weights in device
//! memory, `cuMemAlloc`, never managed memory) and its forward pass: both projections run the
//! `rows_dot` kernel (`rows_dot.cu`, checked in as PTX and JIT-compiled by the driver), which
//! sums each dot product in exactly the order of the CPU's `kernels::dot`; the SwiGLU between
//! them runs on the CPU, whose `exp` the GPU's would not match bit for bit. So an expert gives
//! the same bits on either side and placement never changes a token.
//! Does not own: which experts live on the device (`store`), copies of storage-format bytes
//! (`transfer`), attention and dense layers (still on the CPU).

use anyhow::{anyhow, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use std::sync::{Arc, Mutex, OnceLock};

use crate::experts::FfnWeights;
use crate::kernels::{swiglu, ROW_INVARIANT_MAX};

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

/// An expert's compute-form weights in device memory.
pub struct GpuExpert {
    gpu: Arc<Gpu>,
    gate_up: CudaSlice<f32>,
    down: CudaSlice<f32>,
    intermediate: usize,
    hidden: usize,
}

impl GpuExpert {
    pub fn upload(gpu: &Arc<Gpu>, w: &FfnWeights) -> Result<Self> {
        let _one = gpu.lock.lock().unwrap();
        let gate_up = gpu.stream.clone_htod(&w.gate_up)?;
        let down = gpu.stream.clone_htod(&w.down)?;
        gpu.stream.synchronize()?;
        Ok(Self {
            gpu: gpu.clone(),
            gate_up,
            down,
            intermediate: w.intermediate,
            hidden: w.down.len() / w.intermediate.max(1),
        })
    }

    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        (self.gate_up.len() + self.down.len()) * 4
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
        let g = &self.gpu;
        let _one = g.lock.lock().unwrap();
        let gu = self.rows(&self.gate_up, 2 * i, hidden, x)?;
        let mut act = vec![0f32; t * i];
        swiglu(&gu, i, &mut act);
        let y = self.rows(&self.down, hidden, i, &act)?;
        out.copy_from_slice(&y);
        Ok(())
    }

    /// `x [t, k] @ w^T` for `w [n, k]` in device memory, back on the host.
    fn rows(&self, w: &CudaSlice<f32>, n: usize, k: usize, x: &[f32]) -> Result<Vec<f32>> {
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
        launch
            .arg(w)
            .arg(&xd)
            .arg(&mut out)
            .arg(&n32)
            .arg(&k32)
            .arg(&t32);
        // SAFETY: the kernel reads n*k and t*k floats and writes t*n, the sizes allocated.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("rows_dot launch: {e}"))?;
        Ok(s.clone_dtoh(&out)?)
    }

    fn download(&self) -> Result<FfnWeights> {
        let _one = self.gpu.lock.lock().unwrap();
        Ok(FfnWeights {
            gate_up: self.gpu.stream.clone_dtoh(&self.gate_up)?,
            down: self.gpu.stream.clone_dtoh(&self.down)?,
            intermediate: self.intermediate,
        })
    }
}
