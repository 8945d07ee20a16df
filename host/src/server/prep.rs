//! Request preparation off the async workers and below the model's priority: parsing a large
//! JSON body, rendering a chat template, tokenizing, compiling a grammar.
//!
//! On a machine with few cores, one client sending 7 MB prompts or bodies with 600,000 stop
//! strings made every running stream wait: preparing its requests took the cores the model's
//! forward passes needed. Here that work runs on a small pool of threads at a lower scheduling
//! priority (nice 10 on Linux), so while the model runs, preparation gets the CPU time it leaves.
//!
//! Owns: the pool. Does not own: what is prepared (handlers) or request limits (`openai`).

use std::sync::OnceLock;

/// Threads of the pool (preparation is short; more would only compete with the model).
const THREADS: usize = 2;
/// The pool's `nice` value: well below the model's threads (0), still making progress.
const NICE: i32 = 10;

fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(THREADS)
            .thread_name(|i| format!("moehost-prep-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .expect("cannot start the request preparation threads")
    })
}

#[cfg(target_os = "linux")]
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread (a Linux thread id is a process id here).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, NICE);
    }
}

#[cfg(not(target_os = "linux"))]
fn lower_priority() {}

/// Runs `f` on the preparation pool; `None` if it panicked.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    pool().spawn(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let _ = tx.send(r.ok());
    });
    rx.await.ok().flatten()
}

#[cfg(test)]
mod tests {
    #[test]
    fn work_runs_on_a_lowered_thread_and_comes_back() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let nice = rt.block_on(super::run(|| {
            // SAFETY: reads the calling thread's own priority.
            #[cfg(target_os = "linux")]
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
            #[cfg(not(target_os = "linux"))]
            super::NICE
        }));
        assert_eq!(nice, Some(super::NICE));
        assert_eq!(rt.block_on(super::run(|| -> u8 { panic!("boom") })), None);
    }
}
