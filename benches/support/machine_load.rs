//! How busy the machine is while a benchmark measures (shared by the benches): on a small shared
//! machine a concurrent build can halve a timing, and a table should say so rather than report it
//! as the library's speed. Linux `/proc`; elsewhere every function says "unknown" (None) or
//! returns at once.

use std::time::{Duration, Instant};

/// CPU time snapshot, in clock ticks.
#[derive(Clone, Copy)]
pub struct CpuSnapshot {
    /// All CPUs, every state.
    total: u64,
    /// All CPUs, busy states (user, nice, system, irq, softirq, steal).
    busy: u64,
    /// This process (user + system, all threads).
    own: u64,
}

impl CpuSnapshot {
    pub fn now() -> Option<Self> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let cpu: Vec<u64> = stat
            .lines()
            .next()?
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().ok())
            .collect::<Option<_>>()?;
        let field = |i: usize| cpu.get(i).copied().unwrap_or(0);
        let busy = field(0) + field(1) + field(2) + field(5) + field(6) + field(7);
        let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let rest: Vec<&str> = own_stat.rsplit_once(')')?.1.split_whitespace().collect();
        let own = rest.get(11)?.parse::<u64>().ok()? + rest.get(12)?.parse::<u64>().ok()?;
        Some(Self {
            total: cpu.iter().sum(),
            busy,
            own,
        })
    }

    /// Share of the machine's CPU time (0..1) that other processes used since `self`.
    pub fn foreign_load_since(self, later: Option<Self>) -> Option<f64> {
        let later = later?;
        let total = later.total.checked_sub(self.total)?;
        let foreign = later
            .busy
            .saturating_sub(self.busy)
            .saturating_sub(later.own.saturating_sub(self.own));
        (total > 0).then(|| foreign as f64 / total as f64)
    }
}

/// Waits, at most `max`, until other processes use no more than `threshold` of the CPU over a
/// half-second window. Other people's builds come in bursts: waiting them out is cheaper than
/// publishing halved timings.
pub fn wait_for_quiet(max: Duration, threshold: f64) {
    let start = Instant::now();
    while start.elapsed() < max {
        let before = CpuSnapshot::now();
        std::thread::sleep(Duration::from_millis(500));
        match before.and_then(|b| b.foreign_load_since(CpuSnapshot::now())) {
            Some(load) if load > threshold => continue,
            _ => return,
        }
    }
}

/// The median of some timings.
#[allow(dead_code)]
pub fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// A duration in milliseconds.
pub fn ms(t: Duration) -> f64 {
    t.as_secs_f64() * 1e3
}

/// The CPU's model name (`/proc/cpuinfo`), for the tables' headers.
#[allow(dead_code)]
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Whether the benchmark runs in table mode: `--table` among the arguments or
/// `SEGATTN_BENCH_TABLE=1` (looked for before criterion parses the arguments, which rejects
/// unknown flags).
#[allow(dead_code)]
pub fn table_mode() -> bool {
    std::env::args().any(|a| a == "--table") || std::env::var("SEGATTN_BENCH_TABLE").is_ok_and(|v| v == "1")
}

/// The value after flag `name` on the command line, if the flag is there (the benches' own
/// modes, looked for before criterion parses the arguments).
#[allow(dead_code)]
pub fn flag_value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// The first line of a `--ours-json` file (bench/cpu_peers_report.py reads its CPU and threads).
#[allow(dead_code)]
pub fn ours_json_meta() -> String {
    format!(
        "{{\"meta\":true,\"impl\":\"segattn\",\"threads\":{},\"cpu\":\"{}\"}}",
        rayon::current_num_threads(),
        cpu_model()
    )
}

/// The median time of `call` over at least `min_calls` calls and 1 s (at most `max_calls`), with
/// `prepare` run untimed before each (a cache eviction, or nothing), and how many calls it took.
#[allow(dead_code)]
pub fn median_of_calls<E>(
    (min_calls, max_calls): (usize, usize),
    mut prepare: impl FnMut(),
    mut call: impl FnMut() -> Result<(), E>,
) -> Result<(Duration, usize), E> {
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_calls || (start.elapsed() < Duration::from_secs(1) && times.len() < max_calls) {
        prepare();
        let t = Instant::now();
        call()?;
        times.push(t.elapsed());
    }
    let calls = times.len();
    Ok((median(times), calls))
}
