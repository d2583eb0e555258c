//! Error helpers: every invalid input becomes a `candle_core::Error` whose message names the
//! argument and says what was expected and what was given.

/// Returns early with a `candle_core::Error::Msg` built like `format!`.
macro_rules! invalid_arg {
    ($($arg:tt)*) => {
        return Err(candle_core::Error::Msg(format!("segattn: {}", format!($($arg)*))).bt())
    };
}
pub(crate) use invalid_arg;

/// `n` copies of `x`, or an error naming `what` when that memory cannot be had: sizes a caller
/// chose (`num_key_segments`) can ask for more than the machine holds, where `vec!` would abort
/// the process instead of returning.
pub(crate) fn try_filled<T: Clone>(n: usize, x: T, what: &str) -> candle_core::Result<Vec<T>> {
    let mut v = Vec::new();
    if v.try_reserve_exact(n).is_err() {
        invalid_arg!(
            "{what}: cannot allocate {n} elements ({:.1} GiB)",
            n as f64 * std::mem::size_of::<T>() as f64 / (1u64 << 30) as f64
        );
    }
    v.resize(n, x);
    Ok(v)
}
