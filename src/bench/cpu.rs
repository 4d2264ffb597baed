//! CPU accounting for `ferry bench pipeline`: who spent the machine's processor time while a
//! run's events went through, read from `/proc` (through the `procfs` crate).
//!
//! Every process of interest carries a label (`relay`, `consumer 1`, `postgres: relay
//! decoding`, ...). A [`CpuLedger`] is fed samples of `(pid, label, cpu ticks)` from the start
//! of the measured window to its end and keeps, per process, the ticks it had when first seen
//! and the last ticks read. A process seen at the window's first sample is counted from there;
//! one that appeared later (a Postgres backend opened mid-run) was born inside the window and
//! counts from zero. A process that exits between two samples loses the ticks since the last
//! sample it was seen in (samples are a quarter of a second apart, and the run's processes live
//! throughout). The arithmetic is pure and tested; reading `/proc` is [`ticks_of`].

use std::collections::BTreeMap;

/// One reading of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    /// The process.
    pub pid: i32,
    /// Who it is, for the report.
    pub label: String,
    /// User plus system time so far, in clock ticks.
    pub ticks: u64,
}

#[derive(Debug, Clone)]
struct Seen {
    label: String,
    first: u64,
    last: u64,
}

/// The window's CPU time per process, from samples.
#[derive(Debug, Clone, Default)]
pub struct CpuLedger {
    seen: BTreeMap<i32, Seen>,
    samples: usize,
}

impl CpuLedger {
    /// Adds one sample: every reading taken at the same moment.
    pub fn sample(&mut self, readings: impl IntoIterator<Item = Reading>) {
        let first_sample = self.samples == 0;
        for r in readings {
            let entry = self.seen.entry(r.pid).or_insert_with(|| Seen {
                label: r.label.clone(),
                // Born inside the window: all of its time is the window's.
                first: if first_sample { r.ticks } else { 0 },
                last: r.ticks,
            });
            // A pid reused by another process within the window: start over from it.
            if r.ticks < entry.last || r.label != entry.label {
                *entry = Seen {
                    label: r.label,
                    first: 0,
                    last: r.ticks,
                };
            } else {
                entry.last = r.ticks;
            }
        }
        self.samples += 1;
    }

    /// Ticks spent in the window per label, summed over its processes, in label order.
    pub fn by_label(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        for s in self.seen.values() {
            *out.entry(s.label.clone()).or_insert(0) += s.last - s.first;
        }
        out
    }

    /// Samples taken.
    pub fn samples(&self) -> usize {
        self.samples
    }
}

/// User plus system ticks of `pid` so far; `None` if it is gone or not visible from here
/// (a Postgres on another machine).
pub fn ticks_of(pid: i32) -> Option<u64> {
    let stat = procfs::process::Process::new(pid).ok()?.stat().ok()?;
    Some(stat.utime + stat.stime)
}

/// Seconds per clock tick.
pub fn seconds_per_tick() -> f64 {
    1.0 / procfs::ticks_per_second() as f64
}

/// The machine's busy and total ticks over every core so far (`/proc/stat`).
pub fn machine_ticks() -> Option<(u64, u64)> {
    use procfs::CurrentSI as _;
    let total = procfs::KernelStats::current().ok()?.total;
    let idle = total.idle + total.iowait.unwrap_or(0);
    let busy = total.user
        + total.nice
        + total.system
        + total.irq.unwrap_or(0)
        + total.softirq.unwrap_or(0)
        + total.steal.unwrap_or(0);
    Some((busy, busy + idle))
}

/// The pid of the process whose command line holds every one of `needles` (e.g. the broker
/// listening on the configured address), other than this one.
pub fn find_process(needles: &[&str]) -> Option<i32> {
    let me = std::process::id() as i32;
    procfs::process::all_processes()
        .ok()?
        .filter_map(Result::ok)
        .filter(|p| p.pid() != me)
        .find(|p| {
            p.cmdline()
                .map(|args| {
                    let line = args.join(" ");
                    needles.iter().all(|n| line.contains(n))
                })
                .unwrap_or(false)
        })
        .map(|p| p.pid())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(pid: i32, label: &str, ticks: u64) -> Reading {
        Reading {
            pid,
            label: label.to_owned(),
            ticks,
        }
    }

    #[test]
    fn a_process_seen_from_the_start_counts_from_its_first_reading() {
        let mut l = CpuLedger::default();
        l.sample([r(1, "relay", 500)]);
        l.sample([r(1, "relay", 520)]);
        l.sample([r(1, "relay", 560)]);
        assert_eq!(l.by_label()["relay"], 60);
    }

    #[test]
    fn a_process_born_inside_the_window_counts_from_zero() {
        let mut l = CpuLedger::default();
        l.sample([r(1, "consumers", 100)]);
        l.sample([r(1, "consumers", 110), r(2, "consumers", 7)]);
        l.sample([r(1, "consumers", 120), r(2, "consumers", 9)]);
        assert_eq!(l.by_label()["consumers"], 20 + 9);
    }

    #[test]
    fn a_process_that_exits_keeps_what_was_read_of_it() {
        let mut l = CpuLedger::default();
        l.sample([r(1, "a", 10), r(2, "a", 0)]);
        l.sample([r(1, "a", 15)]);
        l.sample([r(1, "a", 17)]);
        assert_eq!(l.by_label()["a"], 7);
    }

    #[test]
    fn a_reused_pid_starts_over() {
        let mut l = CpuLedger::default();
        l.sample([r(1, "a", 50)]);
        l.sample([r(1, "a", 60)]);
        // Gone, and the pid taken by a new process with fewer ticks.
        l.sample([r(1, "b", 3)]);
        let by = l.by_label();
        assert_eq!(by["b"], 3);
        assert_eq!(l.samples(), 3);
    }

    #[test]
    fn this_process_is_visible_and_the_machine_has_ticks() {
        let me = std::process::id() as i32;
        assert!(ticks_of(me).is_some());
        let (busy, total) = machine_ticks().expect("/proc/stat");
        assert!(total >= busy && total > 0);
        assert!(seconds_per_tick() > 0.0);
    }
}
