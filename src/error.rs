//! Error helpers: every invalid input becomes a `candle_core::Error` whose message names the
//! argument and says what was expected and what was given.

/// Returns early with a `candle_core::Error::Msg` built like `format!`.
macro_rules! invalid_arg {
    ($($arg:tt)*) => {
        return Err(candle_core::Error::Msg(format!("segattn: {}", format!($($arg)*))).bt())
    };
}
pub(crate) use invalid_arg;
