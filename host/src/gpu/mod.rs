//! Experts and attention projections computed on the GPU (feature `cuda`), bit for bit what the CPU computes.
//!
//! Owns: the process's CUDA device for expert compute (found once; `None`, with the reason, when
//! there is no driver or device), `GpuExpert` (an expert's weights in device memory, in their
//! storage format: f32, bf16, FP8 with block scales, int8/int4 with group scales; `cuMemAlloc`,
//! never managed memory) and its forward pass: both projections run the `rows_dot_*` kernels
//! (`rows_dot.cu`, checked in as PTX and JIT-compiled by the driver), which decode each weight
//! in a register exactly as the CPU decodes it and sum each dot product in exactly the order of
//! the CPU's `kernels::dot`, one warp per row; the SwiGLU between them (`swiglu_rows`) uses
//! `kernels::exp_portable`, as the CPU does. So an expert gives the same bits on either side
//! and placement never changes a token.
//! `GpuPool` is the device tier's memory: one `cuMemAlloc` pool of expert slots filled by the
//! transfer scheduler (`transfer::TransferScheduler` over `CudaCopyEngine`): an expert's stored
//! bytes are staged in a pinned host slot and copied on the dedicated copy stream, and compute
//! waits for that expert's copy only. A pooled expert frees its slot when dropped.
//! `GpuMatrix` holds attention's projections (stored format) and MLA's per-head W_UK^T, W_UV
//! (f32, derived at load) for the same kernels; `mla` chains them with attention's norms, RoPE,
//! scores, softmax and context over a KV cache in device memory, one round trip per layer.
//! Does not own: which experts live on the device (`store`), which weights move (`deepseek_v3`).

use anyhow::{anyhow, ensure, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use safetensors::Dtype;
use std::borrow::Cow;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::kernels::{self, ROW_INVARIANT_MAX};
use crate::policy::ExpertKey;
use crate::transfer::cuda::CudaCopyEngine;
use crate::transfer::{CopyEngine, TransferScheduler};
use crate::weights::ffn::{ExpertBytes, FfnWeights, OwnedTensor};
use crate::weights::format::WeightFormat;

mod mla;
mod types;
pub use mla::{DeviceKv, GpuMla};
pub use types::{ExpertSource, MlaDims, MlaSeq, MlaWeights};

/// The kernels (`rows_dot_{f32,bf16,fp8,int8,int4}` and their one-token `_t1` twins), compiled
/// from `rows_dot.cu` by `nvcc -ptx -arch=compute_80` (CUDA 13.0).
const ROWS_DOT_PTX: &str = include_str!("rows_dot.ptx");
/// Rows per block (one warp each), as `WARPS` in the kernel; tokens per warp in the kernels
/// without `_t1`.
const WARPS: u32 = 8;
const TOKENS: u32 = 8;
/// Every tensor (and its scales) starts this aligned in device memory.
const ALIGN: usize = 256;

/// The formats with a kernel (`rows_dot_<name>`), in the kernels' order; each decodes a weight
/// as the CPU does (`checkpoint::decode_f32`, `fp8`, `quant`).
const KERNEL_FORMATS: [WeightFormat; 5] = [
    WeightFormat::F32,
    WeightFormat::Bf16,
    WeightFormat::Fp8,
    WeightFormat::Int8,
    WeightFormat::Int4,
];

/// The kernel format of a stored tensor, if there is one: FP8 needs its scales and the
/// checkpoint's block size, the int formats their scales, f32 and bf16 none.
pub fn kernel_format(
    dtype: Dtype,
    has_scales: bool,
    fp8_block: Option<[usize; 2]>,
) -> Option<WeightFormat> {
    WeightFormat::of(dtype, has_scales, fp8_block).filter(|f| KERNEL_FORMATS.contains(f))
}

fn kernel_index(f: WeightFormat) -> usize {
    KERNEL_FORMATS
        .iter()
        .position(|k| *k == f)
        .expect("only kernel formats reach the GPU")
}

fn aligned(n: usize) -> usize {
    n.next_multiple_of(ALIGN)
}

/// One CUDA device with the kernels loaded.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// By `Format` code: 8 tokens per warp, then 1 (decode steps).
    kernels: [[CudaFunction; 5]; 2],
    /// `fp8::E4M3_TABLE` in device memory, so the GPU decodes FP8 with the CPU's values (the
    /// slice owns the memory, the kernels take its address).
    _e4m3: CudaSlice<f32>,
    e4m3_ptr: u64,
    /// `swiglu_rows`: an expert's activations between its projections.
    swiglu: CudaFunction,
    /// Attention's kernels besides the projections (`mla`).
    mla: mla::MlaKernels,
    /// Expert calls come from the MoE's worker threads; one at a time keeps the stream simple.
    /// The lock holds the input and output buffers the calls reuse.
    scratch: Mutex<Scratch>,
    pub name: String,
}

/// A call's inputs and outputs: pinned host buffers and device buffers of `floats` each, grown
/// as needed. Raw driver memory, so a call costs two copies, a launch and one synchronisation,
/// with no per-call allocation or event bookkeeping.
struct Scratch {
    floats: usize,
    host: [*mut f32; 2],
    device: [u64; 2],
    /// Device-only room for a call's intermediates (`mla`), `work_floats` of them.
    work: u64,
    work_floats: usize,
}

// SAFETY: the pointers are driver allocations owned by the scratch, used under `Gpu::scratch`.
unsafe impl Send for Scratch {}

impl Scratch {
    fn reserve(&mut self, floats: usize) -> Result<()> {
        if floats <= self.floats {
            return Ok(());
        }
        self.release();
        let floats = floats.next_power_of_two();
        for i in 0..2 {
            // SAFETY: plain allocations of `floats` f32s, freed in `release`.
            unsafe {
                self.host[i] = cudarc::driver::result::malloc_host(floats * 4, 0)? as *mut f32;
                self.device[i] = cudarc::driver::result::malloc_sync(floats * 4)?;
            }
        }
        self.floats = floats;
        Ok(())
    }

    /// The work buffer, with room for `floats` values.
    fn reserve_work(&mut self, floats: usize) -> Result<u64> {
        if floats > self.work_floats {
            self.release_work();
            let floats = floats.next_power_of_two();
            // SAFETY: a plain allocation of `floats` f32s, freed in `release_work`.
            self.work = unsafe { cudarc::driver::result::malloc_sync(floats * 4)? };
            self.work_floats = floats;
        }
        Ok(self.work)
    }

    fn release_work(&mut self) {
        if self.work_floats > 0 {
            // SAFETY: allocated in `reserve_work`, no kernel in flight (calls synchronise).
            unsafe {
                let _ = cudarc::driver::result::free_sync(self.work);
            }
        }
        self.work_floats = 0;
    }

    fn release(&mut self) {
        self.release_work();
        if self.floats > 0 {
            for i in 0..2 {
                // SAFETY: allocated in `reserve`, no copy in flight (calls synchronise).
                unsafe {
                    let _ = cudarc::driver::result::free_host(self.host[i] as *mut _);
                    let _ = cudarc::driver::result::free_sync(self.device[i]);
                }
            }
        }
        self.floats = 0;
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        self.release();
    }
}

/// A step's input in `Gpu::run`: host data, or the SwiGLU of an earlier step's fused
/// `[gate | up]` rows (an expert's activations), computed in device memory.
#[derive(Clone, Copy)]
enum Src<'a> {
    Host(&'a [f32]),
    Swiglu(usize),
}

/// One job of `swiglu_rows`, as `SwigluJob` in the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
struct SwigluJob {
    gate_up: u64,
    act: u64,
    rows: i32,
    inter: i32,
}

/// Where one stored tensor and its scales sit in device memory.
#[derive(Clone, Copy)]
struct Placed {
    data: u64,
    scales: u64,
}

/// One job of a grouped launch, as `Job` in the kernel.
#[repr(C)]
#[derive(Clone, Copy)]
struct Job {
    a: u64,
    a_scales: u64,
    b: u64,
    b_scales: u64,
    x: u64,
    out: u64,
    tokens: i32,
    pad: i32,
}

/// A linear layer as the kernels read it: `groups` matrices `[n, k]` in `format`, rows
/// `[0, split)` from `a` and the rest from `b` (an expert's gate and up tensors).
#[derive(Clone, Copy)]
struct Linear {
    format: WeightFormat,
    a: Placed,
    b: Placed,
    split: usize,
    n: usize,
    k: usize,
    groups: usize,
    fp8_block: [usize; 2],
}

impl Linear {
    /// Whether one grouped launch can run both: a single matrix each, of one shape and format.
    fn same_shape(&self, o: &Linear) -> bool {
        self.groups == 1
            && o.groups == 1
            && (self.format, self.split, self.n, self.k, self.fp8_block)
                == (o.format, o.split, o.n, o.k, o.fp8_block)
    }
}

impl Gpu {
    /// `out [t, groups, n]` with `out[t, g, r] = dot(w[g][r, :], x[t, g, ..k])`: the format's
    /// kernel, the result back on the host.
    fn rows_dot(&self, w: &Linear, x: &[f32], x_stride: usize, out: &mut [f32]) -> Result<()> {
        let y = self.run(&[(w, Src::Host(x), x_stride)])?;
        ensure!(
            out.len() == y[0].len(),
            "rows_dot: output of {} for {}",
            out.len(),
            y[0].len()
        );
        out.copy_from_slice(&y[0]);
        Ok(())
    }

    /// Runs `steps` in order with one host round trip: the host inputs go up in one copy, each
    /// step reads host data or the SwiGLU of an earlier step's output (computed and kept in
    /// device memory), and the outputs come down in one copy; a step whose output feeds a
    /// SwiGLU returns nothing (its output stays on the device). Steps of one shape and format
    /// (a MoE layer step's experts) share one grouped launch, which fills the GPU where one
    /// expert's rows would not. The same bits as step by step.
    fn run(&self, steps: &[(&Linear, Src<'_>, usize)]) -> Result<Vec<Vec<f32>>> {
        let mut on_device = vec![false; steps.len()];
        for (n, &(_, x, _)) in steps.iter().enumerate() {
            if let Src::Swiglu(i) = x {
                ensure!(
                    i < n,
                    "step {n} reads the output of step {i}, not run before it"
                );
                on_device[i] = true;
            }
        }
        // Per step: tokens, output length, output offset, input offset (in the host inputs,
        // the outputs or the SwiGLU buffers), all in floats.
        struct Shape {
            t: usize,
            len: usize,
            out_at: usize,
            in_at: usize,
        }
        let mut shapes: Vec<Shape> = Vec::with_capacity(steps.len());
        let mut in_len = 0;
        for (n, &(w, x, x_stride)) in steps.iter().enumerate() {
            let len = match x {
                Src::Host(x) => x.len(),
                Src::Swiglu(i) => {
                    let gu = steps[i].0;
                    ensure!(
                        gu.groups == 1 && gu.n.is_multiple_of(2),
                        "step {n}: step {i}'s output is not fused [gate | up] rows"
                    );
                    shapes[i].len / 2
                }
            };
            let groups = w.groups;
            let t = len / (groups * x_stride).max(1);
            ensure!(
                t * groups * x_stride == len && w.k <= x_stride && t < 1 << 16,
                "rows_dot: {len} inputs are not [tokens < 65536, {groups}, {x_stride}]"
            );
            if let Src::Swiglu(i) = x {
                ensure!(
                    2 * x_stride == steps[i].0.n && t == shapes[i].t,
                    "step {n}: a SwiGLU of {} columns read {x_stride} wide",
                    steps[i].0.n
                );
            }
            let in_at = if let Src::Host(x) = x {
                in_len += x.len();
                in_len - x.len()
            } else {
                0
            };
            shapes.push(Shape {
                t,
                len: t * groups * w.n,
                out_at: 0,
                in_at,
            });
        }
        // The outputs that come back first, then those that stay, then the SwiGLU buffers.
        let mut at = 0;
        for stays in [false, true] {
            for (shape, _) in shapes.iter_mut().zip(&on_device).filter(|s| *s.1 == stays) {
                shape.out_at = at;
                at += shape.len;
            }
        }
        let out_len = shapes
            .iter()
            .zip(&on_device)
            .filter(|s| !*s.1)
            .map(|s| s.0.len)
            .sum::<usize>();
        for n in 0..steps.len() {
            if let Src::Swiglu(_) = steps[n].1 {
                shapes[n].in_at = at;
                at += shapes[n].t * steps[n].2;
            }
        }
        let device_floats = at;
        // Launches: the steps each runs (one, or a group), in order; a step joins a group only
        // if what it reads was launched before that group.
        let mut launches: Vec<Vec<usize>> = Vec::new();
        let mut launch_of = vec![0; steps.len()];
        for (n, &(w, x, x_stride)) in steps.iter().enumerate() {
            let joins = launches.iter().position(|l| {
                let (v, _, stride) = steps[l[0]];
                let ready = match x {
                    Src::Swiglu(i) => launch_of[i] < launch_of[l[0]],
                    Src::Host(_) => true,
                };
                ready && v.same_shape(w) && stride == x_stride
            });
            match joins {
                Some(l) => {
                    launches[l].push(n);
                    launch_of[n] = l;
                }
                None => {
                    launch_of[n] = launches.len();
                    launches.push(vec![n]);
                }
            }
        }
        if shapes.iter().all(|s| s.len == 0) {
            return Ok(shapes.iter().map(|_| Vec::new()).collect());
        }
        // Job tables of grouped launches, then of SwiGLU launches, follow the inputs, 8-byte
        // aligned.
        let tables_at = in_len.next_multiple_of(2);
        let jobs: usize = launches
            .iter()
            .filter(|l| l.len() > 1)
            .map(|l| l.len())
            .sum();
        let swiglu_at = tables_at + jobs * std::mem::size_of::<Job>() / 4;
        let swiglus = steps
            .iter()
            .filter(|s| matches!(s.1, Src::Swiglu(_)))
            .count();
        let in_floats = swiglu_at + swiglus * std::mem::size_of::<SwigluJob>() / 4;
        let s = &self.stream;
        let mut scratch = self.scratch.lock().unwrap();
        self.ctx.bind_to_thread()?;
        scratch.reserve(in_floats.max(device_floats))?;
        let ([hx, hout], [xp, op]) = (scratch.host, scratch.device);
        let device_in = |step: usize| match steps[step].1 {
            Src::Host(_) => xp + 4 * shapes[step].in_at as u64,
            Src::Swiglu(_) => op + 4 * shapes[step].in_at as u64,
        };
        let device_out = |step: usize| op + 4 * shapes[step].out_at as u64;
        // SAFETY: the host input buffer holds `floats` >= in_floats values (the job tables
        // 8-byte aligned within the page-aligned buffer), the device output buffer `floats`
        // >= device_floats; the inputs are in `hx` before the copy is queued, and the stream
        // is synchronised before `hout` is read.
        unsafe {
            let host = std::slice::from_raw_parts_mut(hx, tables_at);
            for (&(_, x, _), shape) in steps.iter().zip(&shapes) {
                if let Src::Host(x) = x {
                    host[shape.in_at..shape.in_at + x.len()].copy_from_slice(x);
                }
            }
            // The alignment padding too: every value copied up has been written.
            host[in_len..].fill(0.0);
            let mut table = hx.add(tables_at) as *mut Job;
            for l in launches.iter().filter(|l| l.len() > 1) {
                for &n in l {
                    let w = steps[n].0;
                    table.write(Job {
                        a: w.a.data,
                        a_scales: w.a.scales,
                        b: w.b.data,
                        b_scales: w.b.scales,
                        x: device_in(n),
                        out: device_out(n),
                        tokens: shapes[n].t as i32,
                        pad: 0,
                    });
                    table = table.add(1);
                }
            }
            // SwiGLU jobs in launch order, so each launch's are consecutive.
            let mut table = hx.add(swiglu_at) as *mut SwigluJob;
            for &n in launches.iter().flatten() {
                if let Src::Swiglu(i) = steps[n].1 {
                    table.write(SwigluJob {
                        gate_up: device_out(i),
                        act: device_in(n),
                        rows: shapes[n].t as i32,
                        inter: steps[n].2 as i32,
                    });
                    table = table.add(1);
                }
            }
            let staged = std::slice::from_raw_parts(hx, in_floats);
            cudarc::driver::result::memcpy_htod_async(xp, staged, s.cu_stream())?;
        }
        let mut table_at = xp + 4 * tables_at as u64;
        let mut swiglu_table = xp + 4 * swiglu_at as u64;
        let launched = (|| -> Result<()> {
            for l in &launches {
                let (w, _, x_stride) = steps[l[0]];
                // The SwiGLUs this launch reads, in one launch of their own first.
                let acts: Vec<usize> = l
                    .iter()
                    .copied()
                    .filter(|&n| matches!(steps[n].1, Src::Swiglu(_)))
                    .collect();
                if !acts.is_empty() {
                    let most = acts.iter().map(|&n| shapes[n].t * steps[n].2).max();
                    self.swiglu(swiglu_table, acts.len(), most.unwrap_or(0))?;
                    swiglu_table += (acts.len() * std::mem::size_of::<SwigluJob>()) as u64;
                }
                let t = l.iter().map(|&n| shapes[n].t).max().unwrap_or(0);
                let table = table_at;
                if l.len() > 1 {
                    table_at += (l.len() * std::mem::size_of::<Job>()) as u64;
                }
                if t == 0 || w.n == 0 {
                    continue;
                }
                if l.len() == 1 {
                    self.launch(w, device_in(l[0]), x_stride, t, device_out(l[0]), None)?;
                } else {
                    self.launch(w, 0, x_stride, t, 0, Some((table, l.len())))?;
                }
            }
            // SAFETY: `hout` holds `floats` >= out_len values, read only after the
            // synchronisation below.
            unsafe {
                let hout = std::slice::from_raw_parts_mut(hout, out_len);
                cudarc::driver::result::memcpy_dtoh_async(hout, op, s.cu_stream())?;
            }
            Ok(())
        })();
        // Whatever happened, nothing queued may still use the scratch buffers after the lock.
        let synced = s.synchronize();
        launched?;
        synced?;
        // SAFETY: the copy into `hout` completed (synchronised above).
        let hout = unsafe { std::slice::from_raw_parts(hout, out_len) };
        Ok(shapes
            .iter()
            .zip(&on_device)
            .map(|(sh, &kept)| match kept {
                true => Vec::new(),
                false => hout[sh.out_at..sh.out_at + sh.len].to_vec(),
            })
            .collect())
    }

    /// Queues `swiglu_rows` over `jobs` SwiGLU jobs of the device table at `table`, the
    /// largest `most` outputs. The caller holds the scratch lock.
    fn swiglu(&self, table: u64, jobs: usize, most: usize) -> Result<()> {
        if most == 0 {
            return Ok(());
        }
        let cfg = LaunchConfig {
            grid_dim: ((most as u32).div_ceil(256).min(1024), jobs as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = self.stream.launch_builder(&self.swiglu);
        launch.arg(&table);
        // SAFETY: each job of the table reads rows x 2 inter values and writes rows x inter,
        // in buffers `run` sized for them.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("swiglu launch: {e}"))?;
        Ok(())
    }

    /// Queues the format's kernel on `t` rows of inputs at device address `xp` (`[t, groups,
    /// x_stride]`), writing `[t, groups, n]` at `op`; or, with `jobs` (a device table and its
    /// length), on every job of that table, `t` being the most tokens of any. The caller
    /// holds the scratch lock.
    fn launch(
        &self,
        w: &Linear,
        xp: u64,
        x_stride: usize,
        t: usize,
        op: u64,
        jobs: Option<(u64, usize)>,
    ) -> Result<()> {
        let scale_cols = match w.format {
            WeightFormat::Fp8 => w.k.div_ceil(w.fp8_block[1]),
            WeightFormat::Int8 | WeightFormat::Int4 => w.k.div_ceil(crate::weights::quant::GROUP),
            _ => 0,
        };
        // The vector path reads FP8 scales by shift (blocks are 128 wide in every checkpoint).
        let bc = w.fp8_block[1];
        let bc_log2 = if bc.is_power_of_two() {
            bc.trailing_zeros() as usize
        } else {
            0
        };
        let ints = [
            w.split,
            w.fp8_block[0],
            bc,
            bc_log2,
            scale_cols,
            w.n,
            w.k,
            t,
            w.groups,
            x_stride,
        ]
        .map(|v| v as i32);
        let tile = if t == 1 { 1 } else { TOKENS };
        let cfg = LaunchConfig {
            grid_dim: (
                (w.n as u32).div_ceil(WARPS),
                (t as u32).div_ceil(tile),
                jobs.map_or(w.groups, |j| j.1) as u32,
            ),
            block_dim: (WARPS * 32, 1, 1),
            shared_mem_bytes: 0,
        };
        let kernel = &self.kernels[(t == 1) as usize][kernel_index(w.format)];
        let mut launch = self.stream.launch_builder(kernel);
        launch.arg(&w.a.data).arg(&w.a.scales);
        launch.arg(&w.b.data).arg(&w.b.scales);
        for v in &ints[..5] {
            launch.arg(v);
        }
        launch.arg(&self.e4m3_ptr).arg(&xp).arg(&op);
        for v in &ints[5..] {
            launch.arg(v);
        }
        let table = jobs.map_or(0, |j| j.0);
        launch.arg(&table);
        // SAFETY: the kernel reads groups*n rows of k weights (and their scales) from the
        // caller's tensors, whose placement `Linear` describes, and t*groups x_stride-wide
        // inputs at `xp`, and writes t*groups*n outputs at `op` (or the same for each job of
        // the table, every one of this shape): the caller sized them all.
        unsafe { launch.launch(cfg) }.map_err(|e| anyhow!("rows_dot launch: {e}"))?;
        Ok(())
    }

    /// Copies `tensors` (each part aligned) into one new device allocation.
    fn to_device(&self, tensors: &[HostTensor<'_>]) -> Result<(CudaSlice<u8>, Vec<Placed>)> {
        let mut bytes = Vec::new();
        for p in parts(tensors) {
            bytes.extend_from_slice(p);
        }
        let _one = self.scratch.lock().unwrap();
        let d = self.stream.clone_htod(&bytes)?;
        self.stream.synchronize()?;
        let base = d.device_ptr(&self.stream).0;
        Ok((d, placements(base, tensors)))
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
            let kernels = |suffix: &str| -> Result<[CudaFunction; 5]> {
                let f: Result<Vec<_>, _> = KERNEL_FORMATS
                    .iter()
                    .map(|f| module.load_function(&format!("rows_dot_{}{suffix}", f.name())))
                    .collect();
                Ok(f?.try_into().expect("five formats"))
            };
            let e4m3 = stream.clone_htod(&crate::weights::fp8::E4M3_TABLE[..])?;
            let e4m3_ptr = e4m3.device_ptr(&stream).0;
            Ok(Gpu {
                ctx: ctx.clone(),
                kernels: [kernels("")?, kernels("_t1")?],
                swiglu: module.load_function("swiglu_rows")?,
                mla: mla::MlaKernels::load(&ctx)?,
                _e4m3: e4m3,
                e4m3_ptr,
                scratch: Mutex::new(Scratch {
                    floats: 0,
                    host: [std::ptr::null_mut(); 2],
                    device: [0; 2],
                    work: 0,
                    work_floats: 0,
                }),
                stream,
                name: info.name.clone(),
            })
        };
        setup()
            .map(Arc::new)
            .map_err(|e| format!("cannot set up {}: {e:#}", info.name))
    })
    .clone()
}

/// A tensor as it goes to device memory: its stored bytes and its scales widened to f32 (the
/// kernels' one scale type).
struct HostTensor<'a> {
    format: WeightFormat,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Cow<'a, [u8]>,
    scales: Option<Vec<f32>>,
}

impl<'a> HostTensor<'a> {
    fn stored(t: &'a OwnedTensor, fp8_block: Option<[usize; 2]>) -> Option<Self> {
        Some(Self {
            format: kernel_format(t.dtype, t.scales.is_some(), fp8_block)?,
            dtype: t.dtype,
            shape: t.shape.clone(),
            bytes: Cow::Borrowed(&t.bytes),
            scales: t.scales.as_ref().map(|s| s.all_f32()),
        })
    }

    /// Rows `rows` of a compute-form matrix with `k` columns.
    fn compute(m: &'a kernels::Matrix, rows: std::ops::Range<usize>, k: usize) -> Self {
        let shape = vec![rows.len(), k];
        let (start, end) = (rows.start * k, rows.end * k);
        match m {
            kernels::Matrix::F32(v) => Self {
                format: WeightFormat::F32,
                dtype: Dtype::F32,
                shape,
                bytes: Cow::Borrowed(as_bytes(&v[start..end])),
                scales: None,
            },
            kernels::Matrix::Bf16(v) => Self {
                format: WeightFormat::Bf16,
                dtype: Dtype::BF16,
                shape,
                bytes: Cow::Owned(
                    v[start..end]
                        .iter()
                        .flat_map(|b| b.0.to_le_bytes())
                        .collect(),
                ),
                scales: None,
            },
        }
    }
}

/// The bytes to copy for `tensors`: each one's data, then its scales, each part padded to
/// `ALIGN`.
fn parts<'a>(tensors: &'a [HostTensor<'_>]) -> Vec<&'a [u8]> {
    static ZEROS: [u8; ALIGN] = [0; ALIGN];
    let mut v = Vec::new();
    for t in tensors {
        for p in [&t.bytes[..], t.scales.as_deref().map_or(&[][..], as_bytes)] {
            v.push(p);
            v.push(&ZEROS[..aligned(p.len()) - p.len()]);
        }
    }
    v
}

/// Where `parts(tensors)` put each tensor, copied to `base`.
fn placements(base: u64, tensors: &[HostTensor<'_>]) -> Vec<Placed> {
    let mut at = base;
    tensors
        .iter()
        .map(|t| {
            let data = at;
            let scales = data + aligned(t.bytes.len()) as u64;
            at = scales + aligned(t.scales.as_ref().map_or(0, |s| s.len() * 4)) as u64;
            Placed { data, scales }
        })
        .collect()
}

/// A linear layer's weight `[n, k]`, or `groups` of them (MLA's per-head W_UK^T and W_UV), in
/// device memory: attention's projections on the GPU. Computed with the row kernels at every
/// token count, so up to `ROW_INVARIANT_MAX` tokens it gives the CPU's bits; above, where the
/// CPU switches to a blocked GEMM, it gives the row kernel's (deterministic, and the same
/// whatever the expert policies and budgets: the invariant holds per backend).
pub struct GpuMatrix {
    gpu: Arc<Gpu>,
    _mem: CudaSlice<u8>,
    linear: Linear,
}

impl GpuMatrix {
    /// Copies `w [groups, n, k]` (f32) into device memory.
    pub fn upload(gpu: &Arc<Gpu>, w: &[f32], groups: usize, k: usize) -> Result<Self> {
        let n = w.len() / (groups * k).max(1);
        ensure!(
            groups * n * k == w.len(),
            "{} weights are not {groups} x [n, {k}]",
            w.len()
        );
        let t = HostTensor {
            format: WeightFormat::F32,
            dtype: Dtype::F32,
            shape: vec![groups * n, k],
            bytes: Cow::Borrowed(as_bytes(w)),
            scales: None,
        };
        Self::place(gpu, t, groups, n, k, None)
    }

    /// Copies a stored tensor of logical shape `[n, k]` into device memory as it is stored
    /// (FP8, bf16, int8/int4 or f32); `None` when no kernel reads its format.
    pub fn upload_stored(
        gpu: &Arc<Gpu>,
        t: &OwnedTensor,
        k: usize,
        fp8_block: Option<[usize; 2]>,
    ) -> Result<Option<Self>> {
        let Some(h) = HostTensor::stored(t, fp8_block) else {
            return Ok(None);
        };
        Self::place(gpu, h, 1, t.rows(), k, fp8_block).map(Some)
    }

    fn place(
        gpu: &Arc<Gpu>,
        t: HostTensor<'_>,
        groups: usize,
        n: usize,
        k: usize,
        fp8_block: Option<[usize; 2]>,
    ) -> Result<Self> {
        let format = t.format;
        let (mem, placed) = gpu.to_device(&[t])?;
        Ok(Self {
            gpu: gpu.clone(),
            _mem: mem,
            linear: Linear {
                format,
                a: placed[0],
                b: placed[0],
                split: n,
                n,
                k,
                groups,
                fp8_block: fp8_block.unwrap_or([1, 1]),
            },
        })
    }

    /// Bytes held in device memory.
    pub fn device_bytes(&self) -> usize {
        self._mem.len()
    }

    /// The storage format the kernel reads.
    pub fn format(&self) -> WeightFormat {
        self.linear.format
    }

    /// `out [t, groups, n]` = each group's matrix times `x [t, groups, x_stride]`'s first `k`.
    pub fn forward(&self, x: &[f32], x_stride: usize, out: &mut [f32]) -> Result<()> {
        self.gpu.rows_dot(&self.linear, x, x_stride, out)
    }
}

/// An expert's three tensors (gate, up, down) as they go to device memory: stored as they are
/// when a kernel reads their format, else decoded to the compute form (f32 or bf16) first.
/// `converted` keeps that compute form alive.
fn expert_tensors<'a>(
    src: &ExpertSource<'a>,
    converted: &'a mut Option<FfnWeights>,
) -> Result<(Vec<HostTensor<'a>>, Option<[usize; 2]>)> {
    let w = match *src {
        ExpertSource::Stored(b) => {
            let stored: Option<Vec<_>> = b
                .tensors
                .iter()
                .map(|t| HostTensor::stored(t, b.fp8_block()))
                .collect();
            match stored {
                Some(v) if v[0].format == v[1].format => return Ok((v, b.fp8_block())),
                _ => &*converted.insert(b.to_ffn()?),
            }
        }
        ExpertSource::Compute(w) => w,
    };
    let i = w.intermediate;
    let hidden = w.down.len() / i.max(1);
    Ok((
        vec![
            HostTensor::compute(&w.gate_up, 0..i, hidden),
            HostTensor::compute(&w.gate_up, i..2 * i, hidden),
            HostTensor::compute(&w.down, 0..hidden, i),
        ],
        None,
    ))
}

/// The bytes `GpuPool::load` stages for `b`, each part aligned: the device slot it needs.
pub fn expert_slot_bytes(b: &ExpertBytes) -> Result<usize> {
    let mut converted = None;
    let (tensors, _) = expert_tensors(&ExpertSource::Stored(b), &mut converted)?;
    Ok(staged_bytes(&parts(&tensors)))
}

fn staged_bytes(parts: &[&[u8]]) -> usize {
    parts.iter().map(|p| p.len()).sum()
}

/// The device tier's expert memory: expert slots in one `cuMemAlloc` pool, filled through
/// pinned staging slots, landing buffers and the copy stream (the transfer scheduler). An
/// expert keeps its storage format in its slot.
pub struct GpuPool {
    gpu: Arc<Gpu>,
    /// Host staging slot i -> a landing buffer in device memory (the scheduler's device slots).
    sched: TransferScheduler<CudaCopyEngine>,
    /// Pinned staging slots not in use (a slot is held from staging until its copy completed).
    staging: Mutex<Vec<usize>>,
    staged: Condvar,
    /// The expert slots, `slot_bytes` each.
    base: u64,
    slot_bytes: usize,
    free: Mutex<Vec<usize>>,
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
    /// `device_slots` experts of `slot_bytes` (see `expert_slot_bytes`) in device memory, and
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
        Ok(Self {
            gpu: gpu.clone(),
            sched: TransferScheduler::new(engine, 2),
            staging: Mutex::new((0..staging).collect()),
            staged: Condvar::new(),
            base,
            slot_bytes,
            free: Mutex::new((0..device_slots).rev().collect()),
        })
    }

    /// Puts `key` in a device slot: its bytes are staged in a pinned slot, copied on the copy
    /// stream into a landing buffer (waiting for this copy only), then moved into the slot.
    /// `None` when no slot is free.
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
        let mut converted = None;
        let (tensors, fp8_block) = expert_tensors(&src, &mut converted)?;
        let parts = parts(&tensors);
        let len = staged_bytes(&parts);
        ensure!(
            len <= self.slot_bytes,
            "expert {key:?} ({len} bytes) does not fit a device slot of {}",
            self.slot_bytes
        );
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
            ensure!(
                !self.sched.is_resident(key),
                "{key:?} is already being loaded"
            );
            self.sched.engine().stage(host_slot, &parts)?;
            let pin = self.sched.demand(key, host_slot)?;
            let landing = self.sched.engine().device_ptr(pin.slot);
            let moved = {
                let _one = self.gpu.scratch.lock().unwrap();
                self.gpu.ctx.bind_to_thread()?;
                let s = &self.gpu.stream;
                // On the compute stream, then synchronised: no kernel reads the slot, and the
                // landing buffer is not released, before the copy completed (a device-to-device
                // cuMemcpyDtoD would not wait).
                // SAFETY: both ranges lie in live device allocations of at least `len` bytes.
                unsafe {
                    cudarc::driver::result::memcpy_dtod_async(out, landing, len, s.cu_stream())
                }
                .and_then(|()| s.synchronize())
                .map_err(|e| anyhow!("device-to-device copy into the slot: {e}"))
            };
            drop(pin);
            self.sched.evict(key);
            moved
        })();
        self.staging.lock().unwrap().push(host_slot);
        self.staged.notify_one();
        landed?;
        GpuExpert::new(
            &self.gpu,
            Memory::Pooled {
                pool: self.clone(),
                slot,
            },
            &tensors,
            placements(out, &tensors),
            fp8_block,
        )
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

/// Whose device memory an expert's weights are in.
enum Memory {
    /// Its own allocation (`GpuExpert::upload`), freed when the expert is dropped.
    Owned(#[allow(dead_code)] CudaSlice<u8>),
    /// A slot of a `GpuPool`, freed when the expert is dropped.
    Pooled { pool: Arc<GpuPool>, slot: usize },
}

/// What it takes to copy one of an expert's tensors back (for steps the CPU must compute).
struct Stored {
    dtype: Dtype,
    shape: Vec<usize>,
    at: Placed,
    bytes: usize,
    scales: Option<usize>,
}

/// An expert's weights in device memory, in their storage format.
pub struct GpuExpert {
    gpu: Arc<Gpu>,
    memory: Memory,
    gate_up: Linear,
    down: Linear,
    tensors: Vec<Stored>,
    fp8_block: Option<[usize; 2]>,
    hidden: usize,
    intermediate: usize,
}

impl Drop for GpuExpert {
    fn drop(&mut self) {
        if let Memory::Pooled { pool, slot } = &self.memory {
            pool.free.lock().unwrap().push(*slot);
        }
    }
}

impl GpuExpert {
    /// Copies `w` (its compute form: f32, or bf16 as stored) into an allocation of its own.
    pub fn upload(gpu: &Arc<Gpu>, w: &FfnWeights) -> Result<Self> {
        Self::upload_source(gpu, ExpertSource::Compute(w))
    }

    /// Copies an expert (or a dense MLP, a shared expert) into an allocation of its own, in its
    /// storage format when a kernel reads it.
    pub fn upload_stored(gpu: &Arc<Gpu>, b: &ExpertBytes) -> Result<Self> {
        Self::upload_source(gpu, ExpertSource::Stored(b))
    }

    fn upload_source(gpu: &Arc<Gpu>, src: ExpertSource<'_>) -> Result<Self> {
        let mut converted = None;
        let (tensors, fp8_block) = expert_tensors(&src, &mut converted)?;
        let (mem, placed) = gpu.to_device(&tensors)?;
        Self::new(gpu, Memory::Owned(mem), &tensors, placed, fp8_block)
    }

    fn new(
        gpu: &Arc<Gpu>,
        memory: Memory,
        tensors: &[HostTensor<'_>],
        placed: Vec<Placed>,
        fp8_block: Option<[usize; 2]>,
    ) -> Result<Self> {
        let rows = |t: &HostTensor<'_>| crate::weights::format::logical_shape(t.dtype, &t.shape)[0];
        let (intermediate, hidden) = (rows(&tensors[0]), rows(&tensors[2]));
        ensure!(
            rows(&tensors[1]) == intermediate,
            "gate and up projections differ in rows"
        );
        let linear = |format, a, b, split, n, k| Linear {
            format,
            a,
            b,
            split,
            n,
            k,
            groups: 1,
            fp8_block: fp8_block.unwrap_or([1, 1]),
        };
        Ok(Self {
            gpu: gpu.clone(),
            memory,
            gate_up: linear(
                tensors[0].format,
                placed[0],
                placed[1],
                intermediate,
                2 * intermediate,
                hidden,
            ),
            down: linear(
                tensors[2].format,
                placed[2],
                placed[2],
                hidden,
                hidden,
                intermediate,
            ),
            tensors: tensors
                .iter()
                .zip(&placed)
                .map(|(t, &at)| Stored {
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    at,
                    bytes: t.bytes.len(),
                    scales: t.scales.as_ref().map(|s| s.len()),
                })
                .collect(),
            fp8_block,
            hidden,
            intermediate,
        })
    }

    /// Bytes held in device memory (weights and scales, as stored there).
    pub fn device_bytes(&self) -> usize {
        self.tensors
            .iter()
            .map(|t| t.bytes + t.scales.unwrap_or(0) * 4)
            .sum()
    }

    /// The storage formats the kernels read: gate_up's and down's.
    pub fn formats(&self) -> [WeightFormat; 2] {
        [self.gate_up.format, self.down.format]
    }

    /// `FfnWeights::forward`, on the GPU, with the same bits (see `forward_experts`).
    pub fn forward(&self, x: &[f32], hidden: usize, out: &mut [f32]) -> Result<()> {
        ensure!(
            out.len() == x.len(),
            "{} outputs for {} inputs",
            out.len(),
            x.len()
        );
        let y = forward_experts(&[(self, x)], hidden)?;
        out.copy_from_slice(&y[0]);
        Ok(())
    }

    /// The stored tensors, copied back to the host.
    fn download(&self) -> Result<ExpertBytes> {
        let _one = self.gpu.scratch.lock().unwrap();
        self.gpu.ctx.bind_to_thread()?;
        let back = |t: &Stored, name: &str| -> Result<OwnedTensor> {
            let mut bytes = vec![0u8; t.bytes];
            // SAFETY: the tensor's bytes and scales were copied completely to these addresses.
            unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut bytes, t.at.data)? };
            let scales = match t.scales {
                Some(n) => {
                    let mut s = vec![0f32; n];
                    // SAFETY: as above.
                    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut s, t.at.scales)? };
                    Some(crate::weights::scales::Scales::from_f32(&s))
                }
                None => None,
            };
            Ok(OwnedTensor {
                name: name.into(),
                dtype: t.dtype,
                shape: t.shape.clone(),
                bytes: bytes.into(),
                scales,
            })
        };
        let [g, u, d] = [0, 1, 2].map(|n| &self.tensors[n]);
        Ok(ExpertBytes::new(
            [
                back(g, "gate_proj")?,
                back(u, "up_proj")?,
                back(d, "down_proj")?,
            ],
            self.fp8_block,
        ))
    }
}

/// Times a layer step's experts (`doctor`'s pseudo-random FP8 ones of hidden size `hidden`) on
/// `gpu`: the first alone, and all of them together; and a device-to-device copy of an
/// expert's size, in one run.
pub fn measure_expert(
    gpu: &Arc<Gpu>,
    layer_step: &[ExpertBytes],
    hidden: usize,
) -> Result<crate::hardware::ExpertSpeed> {
    // A layer step's worth of distinct experts (K2: 8 routed + 1 shared), so none is read
    // from the L2 cache of the one before.
    ensure!(!layer_step.is_empty(), "no experts to time");
    let bytes = layer_step[0].storage_bytes();
    let experts = layer_step
        .iter()
        .map(|e| GpuExpert::upload_stored(gpu, e))
        .collect::<Result<Vec<_>>>()?;
    let time = |experts: &[GpuExpert], tokens: usize| -> Result<f64> {
        let x: Vec<f32> = (0..tokens * hidden)
            .map(|i| (i % 97) as f32 / 97.0 - 0.5)
            .collect();
        let jobs: Vec<_> = experts.iter().map(|e| (e, &x[..])).collect();
        forward_experts(&jobs, hidden)?; // warm up
        let reps = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            forward_experts(&jobs, hidden)?;
        }
        Ok(t0.elapsed().as_secs_f64() / reps as f64)
    };
    let one_token_s = time(&experts[..1], 1)?;
    let eight_tokens_s = time(&experts[..1], 8)?;
    let layer_step_s = time(&experts, 1)?;
    let dtod_gbps = {
        let _one = gpu.scratch.lock().unwrap();
        let s = &gpu.stream;
        let src = s.alloc_zeros::<u8>(bytes)?;
        let mut dst = s.alloc_zeros::<u8>(bytes)?;
        s.memcpy_dtod(&src, &mut dst)?;
        s.synchronize()?;
        let reps = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            s.memcpy_dtod(&src, &mut dst)?;
        }
        s.synchronize()?;
        (2 * bytes * reps) as f64 / t0.elapsed().as_secs_f64() / 1e9
    };
    Ok(crate::hardware::ExpertSpeed {
        one_token_s,
        eight_tokens_s,
        weights_gbps: bytes as f64 / one_token_s / 1e9,
        layer_step_experts: experts.len(),
        layer_step_s,
        layer_step_gbps: (experts.len() * bytes) as f64 / layer_step_s / 1e9,
        dtod_gbps,
    })
}

/// Several experts' `FfnWeights::forward` on the GPU, bit for bit, with one host round trip in
/// all (gate_up, SwiGLU and down stay in device memory), not one per expert: a MoE layer step's
/// experts run together. Above `ROW_INVARIANT_MAX` rows the CPU's kernels switch to a blocked
/// GEMM whose sums no row kernel reproduces, so such an expert is copied back and runs on the
/// CPU.
pub fn forward_experts(jobs: &[(&GpuExpert, &[f32])], hidden: usize) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); jobs.len()];
    let mut on_gpu = Vec::new();
    for (n, &(e, x)) in jobs.iter().enumerate() {
        ensure!(
            hidden == e.hidden && x.len() % hidden == 0,
            "{} inputs of hidden size {hidden} for an expert of hidden size {}",
            x.len(),
            e.hidden
        );
        if x.len() / hidden > ROW_INVARIANT_MAX {
            out[n] = vec![0f32; x.len()];
            e.download()?.to_ffn()?.forward(x, hidden, &mut out[n]);
        } else {
            on_gpu.push(n);
        }
    }
    let Some(&first) = on_gpu.first() else {
        return Ok(out);
    };
    let gpu = &jobs[first].0.gpu;
    // A pooled slot's copy completed before the expert was handed out (`GpuPool::load`).
    // Every gate_up, their SwiGLUs and every down in one round trip.
    let gate_up = on_gpu
        .iter()
        .map(|&n| (&jobs[n].0.gate_up, Src::Host(jobs[n].1), hidden));
    let down = on_gpu.iter().enumerate().map(|(step, &n)| {
        let e = jobs[n].0;
        (&e.down, Src::Swiglu(step), e.intermediate)
    });
    let steps: Vec<_> = gate_up.chain(down).collect();
    let ys = gpu.run(&steps)?;
    for (&n, y) in on_gpu.iter().zip(ys.into_iter().skip(on_gpu.len())) {
        out[n] = y;
    }
    Ok(out)
}
