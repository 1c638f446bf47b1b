//! The generator's own CPU time (user + system, all its threads) over the recorded window. On
//! a machine the generator shares with the daemon, every µs it spends per request is a µs the
//! daemon does not get, so a report says how much of the machine the instrument itself took.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// User + system CPU time of this process so far, all threads (`getrusage(RUSAGE_SELF)`).
pub fn process_cpu() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given and reads nothing else.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::ZERO;
        }
        usage
    };
    let micros = |time: libc::timeval| {
        Duration::from_secs(u64::try_from(time.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(time.tv_usec).unwrap_or(0))
    };
    micros(usage.ru_utime) + micros(usage.ru_stime)
}

/// The process's CPU time from `from` (a moment in the future: the end of the warmup) to the
/// call of [`CpuWindow::finish`].
pub struct CpuWindow {
    started: Arc<Mutex<Option<Duration>>>,
}

impl CpuWindow {
    /// Samples the CPU time at `from` on a thread of its own (the runtime's timer could be up
    /// to a ms late, and the runtime's threads are busy with the load then).
    pub fn start_at(from: Instant) -> CpuWindow {
        let started = Arc::new(Mutex::new(None));
        let slot = started.clone();
        std::thread::Builder::new()
            .name("cpu-window".into())
            .spawn(move || {
                std::thread::sleep(from.saturating_duration_since(Instant::now()));
                *slot.lock().expect("never poisoned") = Some(process_cpu());
            })
            .expect("a thread for the CPU window");
        CpuWindow { started }
    }

    /// The CPU time since the window's start, or None if the run ended before it began.
    pub fn finish(&self) -> Option<Duration> {
        let end = process_cpu();
        let started = (*self.started.lock().expect("never poisoned"))?;
        Some(end.saturating_sub(started))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_counts_the_cpu_spent_inside_it_only() {
        // Goal: the window holds the CPU burnt after its start and not before. Method: open a
        // window starting 600 ms from now, burn 200 ms of this thread's CPU at once (before
        // the start), sleep past the start, burn 200 ms more. The window must hold at least
        // 150 ms and well under the 400 ms of both (the slack is for the other tests of this
        // binary, which getrusage counts too). Until the start it has nothing to report.

        // Burns `length` of this thread's own CPU time (not wall time: a busy machine must not
        // shorten it).
        let burn = |length: Duration| {
            let thread_cpu = || {
                let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
                // SAFETY: clock_gettime writes the timespec it is given.
                assert_eq!(unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) }, 0);
                Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
            };
            let until = thread_cpu() + length;
            let mut spins = 0u64;
            while thread_cpu() < until {
                spins = std::hint::black_box(spins.wrapping_add(1));
            }
        };
        let start = Instant::now() + Duration::from_millis(600);
        let window = CpuWindow::start_at(start);
        burn(Duration::from_millis(200));
        if Instant::now() + Duration::from_millis(50) < start {
            // (Unless a busy machine stretched the burn past the start.)
            assert_eq!(window.finish(), None, "the window has not started yet");
        }
        std::thread::sleep(start.saturating_duration_since(Instant::now()) + Duration::from_millis(50));
        burn(Duration::from_millis(200));
        let spent = window.finish().expect("the window has started");
        assert!(spent >= Duration::from_millis(150), "the 200 ms burnt inside: {spent:?}");
        assert!(spent < Duration::from_millis(350), "not the 200 ms burnt before it: {spent:?}");
    }
}
