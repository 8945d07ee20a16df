//! A copy engine without a GPU: host and device slots are plain memory, and one copy thread
//! plays the copy stream: copies complete in submission order, each taking `latency +
//! bytes / bandwidth`, and the destination fills chunk by chunk while a copy runs, so reading a
//! slot before its event completes sees torn data (what the tests check never happens).

use anyhow::{ensure, Result};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::CopyEngine;

/// Completion of one simulated copy.
#[derive(Default)]
pub struct SimEvent {
    done: Mutex<bool>,
    cv: Condvar,
}

struct Job {
    src: usize,
    dst: usize,
    event: Arc<SimEvent>,
}

pub struct SimulatedLink {
    slot_bytes: usize,
    host: Arc<Vec<Mutex<Vec<u8>>>>,
    device: Arc<Vec<Mutex<Vec<u8>>>>,
    /// The last copy reading each host slot (staging waits for it).
    readers: Mutex<Vec<Option<Arc<SimEvent>>>>,
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

/// Bytes written per step of a running copy.
const CHUNK: usize = 4096;

impl SimulatedLink {
    /// A link of `bytes_per_second` with `latency` per copy, between `host_slots` and
    /// `device_slots` slots of `slot_bytes`.
    pub fn new(
        slot_bytes: usize,
        host_slots: usize,
        device_slots: usize,
        bytes_per_second: f64,
        latency: Duration,
    ) -> Self {
        let host: Arc<Vec<Mutex<Vec<u8>>>> = Arc::new(
            (0..host_slots)
                .map(|_| Mutex::new(vec![0; slot_bytes]))
                .collect(),
        );
        let device: Arc<Vec<Mutex<Vec<u8>>>> = Arc::new(
            (0..device_slots)
                .map(|_| Mutex::new(vec![0; slot_bytes]))
                .collect(),
        );
        let (tx, rx) = mpsc::channel::<Job>();
        let (h, d) = (host.clone(), device.clone());
        let per_chunk = Duration::from_secs_f64(CHUNK as f64 / bytes_per_second.max(1.0));
        let worker = std::thread::Builder::new()
            .name("moehost-sim-copy".into())
            .spawn(move || {
                for job in rx {
                    let start = Instant::now();
                    std::thread::sleep(latency);
                    let src = h[job.src].lock().unwrap().clone();
                    for (i, chunk) in src.chunks(CHUNK).enumerate() {
                        // Pace to the bandwidth: chunk i may land at latency + (i + 1) x per_chunk.
                        let due = latency + per_chunk * (i as u32 + 1);
                        if let Some(wait) = due.checked_sub(start.elapsed()) {
                            std::thread::sleep(wait);
                        }
                        let at = i * CHUNK;
                        d[job.dst].lock().unwrap()[at..at + chunk.len()].copy_from_slice(chunk);
                    }
                    *job.event.done.lock().unwrap() = true;
                    job.event.cv.notify_all();
                }
            })
            .expect("cannot start the simulated copy engine");
        Self {
            slot_bytes,
            host,
            device,
            readers: Mutex::new(vec![None; host_slots]),
            tx: Mutex::new(Some(tx)),
            worker: Some(worker),
        }
    }
}

impl Drop for SimulatedLink {
    fn drop(&mut self) {
        self.tx.lock().unwrap().take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

fn wait_event(e: &SimEvent) {
    let mut done = e.done.lock().unwrap();
    while !*done {
        done = e.cv.wait(done).unwrap();
    }
}

impl CopyEngine for SimulatedLink {
    type Event = Arc<SimEvent>;

    fn slot_bytes(&self) -> usize {
        self.slot_bytes
    }

    fn host_slots(&self) -> usize {
        self.host.len()
    }

    fn device_slots(&self) -> usize {
        self.device.len()
    }

    fn stage(&self, slot: usize, parts: &[&[u8]]) -> Result<()> {
        ensure!(slot < self.host.len(), "host slot {slot} out of range");
        let len: usize = parts.iter().map(|p| p.len()).sum();
        ensure!(len <= self.slot_bytes, "{len} bytes exceed a slot");
        if let Some(reader) = self.readers.lock().unwrap()[slot].take() {
            wait_event(&reader);
        }
        let mut host = self.host[slot].lock().unwrap();
        let mut at = 0;
        for p in parts {
            host[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        Ok(())
    }

    fn copy(&self, src: usize, dst: usize) -> Result<Arc<SimEvent>> {
        ensure!(
            src < self.host.len() && dst < self.device.len(),
            "slot out of range"
        );
        let event = Arc::new(SimEvent::default());
        self.readers.lock().unwrap()[src] = Some(event.clone());
        let tx = self.tx.lock().unwrap();
        tx.as_ref()
            .expect("the engine is running")
            .send(Job {
                src,
                dst,
                event: event.clone(),
            })
            .map_err(|_| anyhow::anyhow!("the simulated copy engine stopped"))?;
        Ok(event)
    }

    fn wait(&self, event: &Arc<SimEvent>) -> Result<()> {
        wait_event(event);
        Ok(())
    }

    fn read_device(&self, slot: usize) -> Result<Vec<u8>> {
        ensure!(slot < self.device.len(), "device slot {slot} out of range");
        Ok(self.device[slot].lock().unwrap().clone())
    }
}
