//! A vectorisable `2^x` for the softmax: the compiler turns a loop of these into SIMD code, which
//! libm's `exp2f` (a call per element) prevents.
//!
//! Range reduction `x = n + f`, `n` the nearest integer, `|f| <= 1/2`, then a degree-6 minimax-style
//! polynomial for `2^f` (relative error below 2e-7, about one f32 ulp) times `2^n` built in the
//! exponent bits. Inputs below -126 give exactly 0 (masked scores are `-inf`).

/// `2^x` for `x` in `[-126, 126]` (larger inputs are clamped); 0 below -126.
#[inline(always)]
pub(crate) fn exp2(x: f32) -> f32 {
    // 1.5 * 2^23: adding and subtracting it rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-126.0, 126.0);
    let t = xc + ROUND;
    let n = t - ROUND;
    let f = xc - n;
    // Taylor coefficients of 2^f = e^(f ln 2), enough terms for f32 on |f| <= 0.5.
    const C1: f32 = std::f32::consts::LN_2;
    const C2: f32 = 0.240_226_5;
    const C3: f32 = 0.055_504_11;
    const C4: f32 = 0.009_618_129;
    const C5: f32 = 0.001_333_355_8;
    const C6: f32 = 0.000_154_035_3;
    let p = 1.0 + f * (C1 + f * (C2 + f * (C3 + f * (C4 + f * (C5 + f * C6)))));
    // The low mantissa bits of `t` hold n (two's complement): no float -> int conversion, whose
    // saturating semantics (`as i32`) would keep this function from vectorising.
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits());
    let scale = f32::from_bits(n_int.wrapping_add(127) << 23);
    if x < -126.0 {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::exp2;

    #[test]
    fn matches_std_within_two_ulp() {
        let mut x = -126.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp2();
            let got = exp2(x) as f64;
            assert!(((got - want) / want).abs() < 4e-7, "x = {x}: {got} vs {want}");
            x += 0.013;
        }
        assert_eq!(exp2(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp2(-200.0), 0.0);
        assert_eq!(exp2(0.0), 1.0);
    }
}
