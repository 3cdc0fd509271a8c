//! CPU accounting for the adapter benches, shared by them through `#[path]`: the CPU
//! time this process used, and the CPU time the whole machine used (the broker, its
//! client library's threads and this process together), both from procfs at the
//! kernel's clock-tick resolution (10 ms here). Where there is no procfs both read zero
//! and the benches print zeros.

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
