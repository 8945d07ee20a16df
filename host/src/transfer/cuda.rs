//! The CUDA copy engine (feature `cuda`): the host tier's staging slab in pinned (page-locked)
//! memory, allocated once; device slots in one `cuMemAlloc` pool (never managed memory); copies
//! with `cuMemcpyHtoDAsync` on a dedicated copy stream, each followed by an event, so the
//! scheduler waits for exactly the copy it needs while compute runs on other streams.
//!
//! The driver is loaded at run time (cudarc `dynamic-loading`): without one, `probe` says so
//! and every caller goes on on the CPU. cudarc panics when libcuda is missing, so nothing here
//! touches the driver before `probe` has found it.

use anyhow::{anyhow, bail, ensure, Result};
use cudarc::driver::{result, sys, CudaContext, CudaEvent, CudaStream};
use std::sync::{Arc, Mutex};

use super::CopyEngine;

/// What the driver reports about device 0.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeviceInfo {
    pub name: String,
    pub devices: i32,
    /// e.g. 12080 for CUDA 12.8.
    pub driver_version: i32,
    pub compute_capability: (i32, i32),
    pub total_bytes: usize,
    pub free_bytes: usize,
}

/// Device 0's facts, or why there is no usable CUDA device (no libcuda, no device, an error).
pub fn probe() -> Result<(Arc<CudaContext>, DeviceInfo), String> {
    // SAFETY: only checks whether the shared library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err("no CUDA driver found (libcuda.so could not be loaded)".into());
    }
    let attempt = std::panic::catch_unwind(|| -> Result<_, String> {
        let devices =
            CudaContext::device_count().map_err(|e| format!("cuInit/cuDeviceGetCount: {e}"))?;
        if devices < 1 {
            return Err("the CUDA driver sees no device".into());
        }
        let ctx = CudaContext::new(0).map_err(|e| format!("cannot open device 0: {e}"))?;
        let mut version = 0;
        // SAFETY: an out-pointer to a live local.
        unsafe { sys::cuDriverGetVersion(&mut version) }
            .result()
            .map_err(|e| format!("cuDriverGetVersion: {e}"))?;
        let attr = |a| ctx.attribute(a).unwrap_or(0);
        let (free_bytes, total_bytes) = ctx
            .mem_get_info()
            .map_err(|e| format!("cuMemGetInfo: {e}"))?;
        let info = DeviceInfo {
            name: ctx.name().unwrap_or_else(|_| "unknown".into()),
            devices,
            driver_version: version,
            compute_capability: (
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR),
                attr(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR),
            ),
            total_bytes,
            free_bytes,
        };
        Ok((ctx, info))
    });
    attempt.unwrap_or_else(|_| Err("the CUDA driver could not be initialised".into()))
}

/// Pinned host slab + device pool + copy stream.
pub struct CudaCopyEngine {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    slot_bytes: usize,
    host_slots: usize,
    device_slots: usize,
    host: *mut u8,
    device: sys::CUdeviceptr,
    /// The last copy reading each host slot: staging into it waits for that copy.
    readers: Mutex<Vec<Option<Arc<CudaEvent>>>>,
    /// Bytes staged in each host slot: a copy moves only those (an FP8 expert is a quarter of
    /// its f32 slot).
    staged: Mutex<Vec<usize>>,
    pinned: bool,
}

// SAFETY: the raw pointers are owned allocations only touched through `&self` methods that
// synchronise on the per-slot events; the driver API is thread-safe once the context is bound.
unsafe impl Send for CudaCopyEngine {}
unsafe impl Sync for CudaCopyEngine {}

impl CudaCopyEngine {
    /// `host_slots` + `device_slots` slots of `slot_bytes`. `pinned = false` stages in pageable
    /// memory instead (doctor's comparison; copies from it are not truly asynchronous).
    pub fn new(
        ctx: Arc<CudaContext>,
        slot_bytes: usize,
        host_slots: usize,
        device_slots: usize,
        pinned: bool,
    ) -> Result<Self> {
        ensure!(
            slot_bytes > 0 && host_slots > 0 && device_slots > 0,
            "empty slab"
        );
        ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow!("cannot create the copy stream: {e}"))?;
        let host_len = slot_bytes * host_slots;
        let host = if pinned {
            // SAFETY: a fresh page-locked allocation, freed in Drop with free_host.
            unsafe { result::malloc_host(host_len, 0) }
                .map_err(|e| anyhow!("cannot pin {host_len} bytes of host memory: {e}"))?
                as *mut u8
        } else {
            Box::into_raw(vec![0u8; host_len].into_boxed_slice()) as *mut u8
        };
        // SAFETY: plain device allocation, freed in Drop.
        let device = unsafe { result::malloc_sync(slot_bytes * device_slots) }.map_err(|e| {
            anyhow!(
                "cannot allocate {} bytes of device memory: {e}",
                slot_bytes * device_slots
            )
        })?;
        Ok(Self {
            ctx,
            stream,
            slot_bytes,
            host_slots,
            device_slots,
            host,
            device,
            readers: Mutex::new(vec![None; host_slots]),
            staged: Mutex::new(vec![slot_bytes; host_slots]),
            pinned,
        })
    }

    /// Host slot `slot` (callers check the range). Writers wait for the slot's last reader
    /// first (`stage`); copies only read.
    fn host_slot(&self, slot: usize) -> *mut u8 {
        // SAFETY: in bounds of the slab for slot < host_slots.
        unsafe { self.host.add(slot * self.slot_bytes) }
    }
}

impl CudaCopyEngine {
    /// Device address of device slot `slot` (kernels read expert weights there).
    pub fn device_ptr(&self, slot: usize) -> u64 {
        self.device + (slot * self.slot_bytes) as u64
    }
}

impl Drop for CudaCopyEngine {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        let _ = self.stream.synchronize();
        // SAFETY: allocated in `new` with the matching allocator, not used after this.
        unsafe {
            let _ = result::free_sync(self.device);
            if self.pinned {
                let _ = result::free_host(self.host as _);
            } else {
                drop(Box::from_raw(std::ptr::slice_from_raw_parts_mut(
                    self.host,
                    self.slot_bytes * self.host_slots,
                )));
            }
        }
    }
}

impl CopyEngine for CudaCopyEngine {
    type Event = Arc<CudaEvent>;

    fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn host_slots(&self) -> usize {
        self.host_slots
    }

    fn staged_bytes(&self, slot: usize) -> usize {
        self.staged.lock().unwrap()[slot]
    }

    fn device_slots(&self) -> usize {
        self.device_slots
    }

    fn stage(&self, slot: usize, parts: &[&[u8]]) -> Result<()> {
        ensure!(slot < self.host_slots, "host slot {slot} out of range");
        let len: usize = parts.iter().map(|p| p.len()).sum();
        ensure!(len <= self.slot_bytes, "{len} bytes exceed a slot");
        if let Some(reader) = self.readers.lock().unwrap()[slot].take() {
            reader.synchronize().map_err(|e| anyhow!("{e}"))?;
        }
        self.staged.lock().unwrap()[slot] = len;
        let mut at = 0;
        for p in parts {
            // SAFETY: in bounds (len checked above), and no copy reads the slot any more.
            unsafe {
                std::ptr::copy_nonoverlapping(p.as_ptr(), self.host_slot(slot).add(at), p.len())
            };
            at += p.len();
        }
        Ok(())
    }

    fn copy(&self, src: usize, dst: usize) -> Result<Arc<CudaEvent>> {
        ensure!(
            src < self.host_slots && dst < self.device_slots,
            "slot out of range"
        );
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        let dst_ptr = self.device + (dst * self.slot_bytes) as u64;
        // SAFETY: both ranges are in bounds of live allocations; the host slot is not written
        // until this copy's event completes (`stage` waits for it).
        let len = self.staged_bytes(src);
        unsafe {
            let src = std::slice::from_raw_parts(self.host_slot(src), len);
            result::memcpy_htod_async(dst_ptr, src, self.stream.cu_stream())
        }
        .map_err(|e| anyhow!("cuMemcpyHtoDAsync: {e}"))?;
        let event = Arc::new(
            self.stream
                .record_event(Some(sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC))
                .map_err(|e| anyhow!("cuEventRecord: {e}"))?,
        );
        self.readers.lock().unwrap()[src] = Some(event.clone());
        Ok(event)
    }

    fn wait(&self, event: &Arc<CudaEvent>) -> Result<()> {
        event
            .synchronize()
            .map_err(|e| anyhow!("cuEventSynchronize: {e}"))
    }

    fn read_device(&self, slot: usize) -> Result<Vec<u8>> {
        if slot >= self.device_slots {
            bail!("device slot {slot} out of range");
        }
        self.ctx.bind_to_thread().map_err(|e| anyhow!("{e}"))?;
        self.stream.synchronize().map_err(|e| anyhow!("{e}"))?;
        let mut out = vec![0u8; self.slot_bytes];
        // SAFETY: in bounds of the device pool; synchronous copy into a live buffer.
        unsafe {
            result::memcpy_dtoh_sync(&mut out, self.device + (slot * self.slot_bytes) as u64)
        }
        .map_err(|e| anyhow!("cuMemcpyDtoH: {e}"))?;
        Ok(out)
    }
}
