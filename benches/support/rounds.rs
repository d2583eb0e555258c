//! Timing calls that are compared with each other (shared by the benches' table modes): a warm-up,
//! then rounds in which every call runs once, in rotating order, each timed alone, so that load
//! from other processes and the machine's state hit them alike.

use std::time::{Duration, Instant};

/// Runs every op for at least `warm_up`, then `rounds` rounds; `prepare` runs untimed before each
/// timed call. Returns each op's times, in the order of `ops`.
pub fn timed_rounds(rounds: usize, ops: &[&dyn Fn()], warm_up: Duration, prepare: &dyn Fn()) -> Vec<Vec<Duration>> {
    let warm = Instant::now();
    while warm.elapsed() < warm_up {
        for op in ops {
            op();
        }
    }
    let mut t = vec![Vec::with_capacity(rounds); ops.len()];
    for round in 0..rounds {
        for i in 0..ops.len() {
            let op = (round + i) % ops.len();
            prepare();
            let start = Instant::now();
            ops[op]();
            t[op].push(start.elapsed());
        }
    }
    t
}
