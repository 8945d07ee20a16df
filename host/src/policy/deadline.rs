//! A plugin call's deadline, in the calling thread's CPU time.
//!
//! Owns: when a call has run out of time. Does not own: the ticks that make wasmtime ask (the
//! engine's epoch thread, `wasm`), or what a timeout costs the plugin (`guard`).
//!
//! Wall-clock deadlines punish a plugin for the host's scheduling: on a loaded machine a thread
//! descheduled for 15 ms mid-call timed out a 2 us policy, and enough of those quarantined the
//! bundled defaults. So a call is out of time when its thread has spent the budget on the CPU
//! (memory growth inside the call included, which runs on the same thread), or, as a backstop
//! against a thread starved for good, when ten budgets of wall time have passed.

use std::time::{Duration, Instant};

/// Wall time a call may take, in budgets, however little CPU it got.
const WALL_FACTOR: u32 = 10;

/// The clock of the call under way (set as each call starts).
///
/// Starting it reads no clock: reading the thread's CPU time is a system call (~250 ns here,
/// more than a whole bundled policy call) and even the wall clock costs ~20 ns, several times
/// per MoE layer step. Most calls end before the first epoch tick and never read either. The
/// first tick reads both, and charges the call one whole tick interval for the time before it
/// (CPU and wall): a thread that kept the CPU meets a tick within one interval, and one that was
/// descheduled meanwhile is not charged for that.
#[derive(Debug, Clone, Copy)]
pub struct CallClock {
    budget: Duration,
    tick: Duration,
    /// At the first tick: the wall time and the thread's CPU time then.
    first_tick: Option<(Instant, Option<Duration>)>,
}

impl CallClock {
    /// A call's clock; `tick`: the interval at which it will be asked [`CallClock::expired`].
    pub fn start(budget: Duration, tick: Duration) -> Self {
        Self {
            budget,
            tick,
            first_tick: None,
        }
    }

    /// Whether the call has used its time (asked on each epoch tick while it runs).
    pub fn expired(&mut self) -> bool {
        let (wall, cpu) = match self.first_tick {
            None => {
                self.first_tick = Some((Instant::now(), thread_cpu_time()));
                (self.tick, self.tick)
            }
            Some((wall_at, cpu_at)) => {
                let wall = self.tick + wall_at.elapsed();
                let cpu = match (cpu_at, thread_cpu_time()) {
                    (Some(a), Some(b)) => self.tick + b.saturating_sub(a),
                    _ => wall,
                };
                (wall, cpu)
            }
        };
        out_of_time(cpu, wall, self.budget)
    }
}

fn out_of_time(cpu: Duration, wall: Duration, budget: Duration) -> bool {
    cpu >= budget || wall >= budget * WALL_FACTOR
}

/// CPU time of the calling thread (`None` where the platform has no such clock).
fn thread_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid timespec for the call to fill.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_decides_and_wall_time_is_a_backstop() {
        let ms = Duration::from_millis;
        // Descheduled for 50 ms with 1 ms of CPU: not out of a 10 ms budget.
        assert!(!out_of_time(ms(1), ms(50), ms(10)));
        // Spinning: out once the CPU time reaches the budget.
        assert!(out_of_time(ms(10), ms(10), ms(10)));
        // Starved for ten budgets: out whatever the CPU time.
        assert!(out_of_time(ms(0), ms(100), ms(10)));
    }

    #[test]
    fn a_spinning_thread_runs_out_and_a_sleeping_one_does_not() {
        let tick = Duration::from_millis(1);
        let mut clock = CallClock::start(Duration::from_millis(20), tick);
        std::thread::sleep(Duration::from_millis(40));
        assert!(
            !clock.expired(),
            "sleeping before the first tick is not spending the budget"
        );
        std::thread::sleep(Duration::from_millis(40));
        assert!(!clock.expired(), "nor is sleeping after it");
        let mut clock = CallClock::start(Duration::from_millis(5), tick);
        let t0 = Instant::now();
        let mut x = 0u64;
        while !clock.expired() {
            x = x.wrapping_add(1);
            assert!(t0.elapsed() < Duration::from_secs(60), "never expired");
        }
        assert!(x > 0);
    }
}
