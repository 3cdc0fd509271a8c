//! The time a cache line takes to go from one core to another and back, shared by the
//! benches through `#[path]`. On a virtual machine it depends on where the host places
//! the virtual CPUs, and it can change while the machine runs: on one 2-core machine it
//! read about 90 ns at some times and about 430 ns at others, and with it the CPU that
//! redrive's Worker spent per Kafka record went from about 6 to about 10 µs with spawned
//! calls. The benches read it before their runs (not after: threads of the clients they
//! closed can still be running then, and the reading comes out high) and print it, so
//! that a reader can tell which of these a run had.

use std::time::Duration;

/// Two threads, each pinned to a core of its own, hand a counter back and forth; the
/// fastest of five tries of 20,000 round trips, since whatever else runs on the machine
/// (a preempted thread, another process) only ever adds time. `None` with fewer than two
/// cores, or where threads cannot be pinned. Unpinned, it read 600 to 720 ns in the
/// Kafka bench on a machine where a C program with pinned threads read 50 to 65 ns.
/// Pinned, it read 69 to 82 ns there, but 800 to 850 ns in one run of four, between C
/// readings of 53 to 61 ns: a reading many times the usual one says little. On a busy
/// machine even the fastest try can read high: run the bench on an otherwise idle one.
pub(crate) fn core_round_trip() -> Option<Duration> {
    use std::sync::Barrier;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// The counter, on a cache line of its own.
    #[repr(align(128))]
    struct Line(AtomicU64);

    /// Spins until `line` holds `value`, yielding the CPU now and then, so that a
    /// thread that finds its core taken still ends. No `spin_loop` hint: its pause (tens
    /// of cycles on some CPUs) would add to every trip and hide the transfer.
    fn wait_for(line: &Line, value: u64) {
        let mut spins = 0u32;
        while line.0.load(Ordering::Acquire) != value {
            spins = spins.wrapping_add(1);
            if spins & 0x3fff == 0 {
                std::thread::yield_now();
            }
        }
    }

    const TRIPS: u64 = 20_000;
    let cores = core_affinity::get_core_ids()?;
    let (&first, &second) = (cores.first()?, cores.get(1)?);
    (0..5)
        .map(|_| {
            let line = Line(AtomicU64::new(0));
            let pinned = AtomicBool::new(true);
            let both_pinned = Barrier::new(2);
            // Both on threads of their own: pinning the caller would keep it on one
            // core for the rest of the bench.
            std::thread::scope(|s| {
                let (line, pinned, both_pinned) = (&line, &pinned, &both_pinned);
                let pin = move |core| {
                    if !core_affinity::set_for_current(core) {
                        pinned.store(false, Ordering::Relaxed);
                    }
                    both_pinned.wait();
                    pinned.load(Ordering::Relaxed)
                };
                s.spawn(move || {
                    if pin(second) {
                        for i in 0..TRIPS {
                            wait_for(line, 2 * i + 1);
                            line.0.store(2 * i + 2, Ordering::Release);
                        }
                    }
                });
                s.spawn(move || {
                    if !pin(first) {
                        return None;
                    }
                    let start = std::time::Instant::now();
                    for i in 0..TRIPS {
                        line.0.store(2 * i + 1, Ordering::Release);
                        wait_for(line, 2 * i + 2);
                    }
                    Some(start.elapsed() / TRIPS as u32)
                })
                .join()
                .ok()?
            })
        })
        .collect::<Option<Vec<_>>>()?
        .into_iter()
        .min()
}

/// [`core_round_trip`] as the benches print it.
pub(crate) fn describe_core_round_trip() -> String {
    match core_round_trip() {
        Some(d) => format!("{} ns", d.as_nanos()),
        None => "not measured (fewer than two cores, or threads could not be pinned)".to_owned(),
    }
}
