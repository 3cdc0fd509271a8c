//! The time a cache line takes to go from one core to another and back, shared by the
//! benches through `#[path]`. On a virtual machine it depends on where the host places
//! the virtual CPUs, and it can change while the machine runs: on one 2-core machine it
//! read about 90 ns at some times and about 430 ns at others, and with it the CPU that
//! redrive's Worker spent per Kafka record went from about 6 to about 10 µs with spawned
//! calls. The benches read it before their runs (not after: threads of the clients they
//! closed can still be running then, and the reading comes out high) and print it, so
//! that a reader can tell which of these a run had.

use std::time::Duration;

/// Two threads hand a counter back and forth; the fastest of five tries of 20,000 round
/// trips, since whatever else runs on the machine (a preempted thread, another process)
/// only ever adds time. `None` with fewer than two CPUs, where the threads would take
/// turns on one core and measure the scheduler instead. On a busy machine even the
/// fastest try can read high: run the bench on an otherwise idle one.
pub(crate) fn core_round_trip() -> Option<Duration> {
    use std::sync::atomic::{AtomicU64, Ordering};

    /// The counter, on a cache line of its own.
    #[repr(align(128))]
    struct Line(AtomicU64);

    /// Spins until `line` holds `value`, yielding the CPU now and then, so a thread
    /// that shares its core with the other still ends. No `spin_loop` hint: its pause
    /// (tens of cycles on some CPUs) would add to every trip and hide the transfer.
    fn wait_for(line: &Line, value: u64) {
        let mut spins = 0u32;
        while line.0.load(Ordering::Acquire) != value {
            spins = spins.wrapping_add(1);
            if spins & 0x3fff == 0 {
                std::thread::yield_now();
            }
        }
    }

    const TRIPS: u32 = 20_000;
    if std::thread::available_parallelism().map_or(1, usize::from) < 2 {
        return None;
    }
    (0..5)
        .map(|_| {
            let line = Line(AtomicU64::new(0));
            std::thread::scope(|s| {
                s.spawn(|| {
                    for i in 0..u64::from(TRIPS) {
                        wait_for(&line, 2 * i + 1);
                        line.0.store(2 * i + 2, Ordering::Release);
                    }
                });
                let start = std::time::Instant::now();
                for i in 0..u64::from(TRIPS) {
                    line.0.store(2 * i + 1, Ordering::Release);
                    wait_for(&line, 2 * i + 2);
                }
                start.elapsed() / TRIPS
            })
        })
        .min()
}

/// [`core_round_trip`] as the benches print it.
pub(crate) fn describe_core_round_trip() -> String {
    match core_round_trip() {
        Some(d) => format!("{} ns", d.as_nanos()),
        None => "not measured (one CPU)".to_owned(),
    }
}
