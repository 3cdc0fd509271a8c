//! CPU accounting for the adapter benches, shared by them through `#[path]`: the CPU
//! time this process used, and the CPU time the whole machine used (the broker, its
//! client library's threads and this process together), both from procfs at the
//! kernel's clock-tick resolution (10 ms here). Where there is no procfs both read zero
//! and the benches print zeros.
//!
//! Also the time a cache line takes to go from one core to another and back
//! ([`core_round_trip`]). On a virtual machine it depends on where the host places the
//! virtual CPUs, and it can change while the machine runs: on one 2-core machine it read
//! about 90 ns at some times and about 430 ns at others, and with it the CPU that
//! redrive's Worker spent per Kafka record went from about 6 to about 10 µs with spawned
//! calls. The benches read it before their runs (not after: threads of the clients they
//! closed can still be running then, and the reading comes out high) and print it, so
//! that a reader can tell which of these a run had.

use std::time::Duration;

/// CPU time of this process and of the whole machine at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuTimes {
    process: Duration,
    machine: Duration,
}

/// CPU time spent between two readings.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct CpuUsed {
    /// By this process (user + system).
    pub(crate) process: Duration,
    /// By every process on the machine (all CPUs' user, nice, system, irq and softirq
    /// time): the broker on this machine included.
    pub(crate) machine: Duration,
}

impl CpuTimes {
    /// Reads both clocks now.
    pub(crate) fn now() -> Self {
        CpuTimes {
            process: process_cpu(),
            machine: machine_cpu(),
        }
    }

    /// CPU time spent since `self`.
    pub(crate) fn since(self) -> CpuUsed {
        let now = CpuTimes::now();
        CpuUsed {
            process: now.process.saturating_sub(self.process),
            machine: now.machine.saturating_sub(self.machine),
        }
    }
}

/// Clock ticks per second of procfs's counters (`USER_HZ`, 100 on Linux).
const TICK: Duration = Duration::from_millis(10);

/// utime + stime of `/proc/self/stat`.
fn process_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) end at its closing paren;
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
}

/// Busy time of all CPUs from the `cpu` line of `/proc/stat`: user, nice, system, irq
/// and softirq (idle, iowait and steal are not work done here).
fn machine_cpu() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return Duration::ZERO;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return Duration::ZERO;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...
    let ticks: u64 = [0, 1, 2, 5, 6].iter().filter_map(|&i| fields.get(i)).sum();
    TICK * u32::try_from(ticks).unwrap_or(u32::MAX)
}

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
