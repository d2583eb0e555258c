//! Tests of the SIMT emulator (kernels/emu/) through the small test kernels of
//! kernels/emu/tests/, which build.rs compiles into the crate's static library of emulated
//! kernels. Every test runs under several schedules; settings are per OS thread, so tests may run
//! in parallel.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int};
use std::time::Instant;

// Links the crate, and with it the bundled static library of emulated kernels.
use segattn as _;

extern "C" {
    fn segattn_emu_set_schedule(schedule: c_int, seed: u64);
    fn segattn_emu_last_error() -> *const c_char;

    fn segattn_emu_test_mma(
        is_bf16: c_int,
        warps: c_int,
        a: *const u16,
        b: *const u16,
        c: *const f32,
        d: *mut f32,
    ) -> c_int;
    fn segattn_emu_test_wgmma(
        mode: c_int,
        is_bf16: c_int,
        a: *const u16,
        tile: *const u16,
        c: *const f32,
        d: *mut f32,
        k_steps: c_int,
        skip_wait: c_int,
    ) -> c_int;
    fn segattn_emu_test_ldmatrix(mode: c_int, src: *const u16, out: *mut u32) -> c_int;
    fn segattn_emu_test_cp_async(mode: c_int, src: *const u8, out: *mut u8) -> c_int;
    fn segattn_emu_test_proxy_fence(mode: c_int, tile: *const u16, out: *mut f32) -> c_int;
    fn segattn_emu_test_warp_ops(out: *mut c_int) -> c_int;
    fn segattn_emu_test_shuffle_loop(iters: c_int, warps: c_int, out: *mut f32) -> c_int;
    fn segattn_emu_test_failure(mode: c_int, threads: c_int, out: *mut c_int) -> c_int;
    fn segattn_emu_test_tiled_matmul(
        mode: c_int,
        a: *const u16,
        b: *const u16,
        c: *mut f32,
        m: c_int,
        n: c_int,
        k: c_int,
    ) -> c_int;
}

// segattn_emu_schedule (kernels/emu/emu_api.h).
const FORWARD: c_int = 0;
const REVERSE: c_int = 1;
const LOW_FIRST: c_int = 2;
const HIGH_FIRST: c_int = 3;
const RANDOM: c_int = 4;
const RANDOM_WARP: c_int = 5;

/// (schedule, seed, name): every schedule, random ones with two seeds.
const SCHEDULES: [(c_int, u64, &str); 8] = [
    (FORWARD, 0, "forward"),
    (REVERSE, 0, "reverse"),
    (LOW_FIRST, 0, "low-first"),
    (HIGH_FIRST, 0, "high-first"),
    (RANDOM, 1, "random/1"),
    (RANDOM, 2, "random/2"),
    (RANDOM_WARP, 1, "random-warp/1"),
    (RANDOM_WARP, 2, "random-warp/2"),
];

fn set_schedule(schedule: c_int, seed: u64) {
    unsafe { segattn_emu_set_schedule(schedule, seed) }
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(segattn_emu_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Ok, or the emulator's message of the failed launch.
fn check(rc: c_int) -> Result<(), String> {
    if rc == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// Deterministic test data in [-1, 1).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn bf16_bits(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}
fn bf16_value(b: u16) -> f32 {
    half::bf16::from_bits(b).to_f32()
}
fn f16_bits(x: f32) -> u16 {
    half::f16::from_f32(x).to_bits()
}
fn f16_value(b: u16) -> f32 {
    half::f16::from_bits(b).to_f32()
}

// ---- mma ------------------------------------------------------------------------------------

#[test]
fn mma_matches_plain_matmul() {
    const WARPS: usize = 2;
    for is_bf16 in [true, false] {
        let to_bits: fn(f32) -> u16 = if is_bf16 { bf16_bits } else { f16_bits };
        let value: fn(u16) -> f32 = if is_bf16 { bf16_value } else { f16_value };
        let mut rng = Lcg(if is_bf16 { 7 } else { 8 });
        let a: Vec<u16> = (0..WARPS * 256).map(|_| to_bits(rng.next() * 4.0)).collect();
        let b: Vec<u16> = (0..WARPS * 128).map(|_| to_bits(rng.next() * 4.0)).collect();
        let c: Vec<f32> = (0..WARPS * 128).map(|_| rng.next() * 8.0).collect();

        let mut first: Option<Vec<f32>> = None;
        for (schedule, seed, name) in SCHEDULES {
            set_schedule(schedule, seed);
            let mut d = vec![f32::NAN; WARPS * 128];
            check(unsafe {
                segattn_emu_test_mma(
                    is_bf16 as c_int,
                    WARPS as c_int,
                    a.as_ptr(),
                    b.as_ptr(),
                    c.as_ptr(),
                    d.as_mut_ptr(),
                )
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            for w in 0..WARPS {
                for i in 0..16 {
                    for j in 0..8 {
                        let mut exact = f64::from(c[w * 128 + i * 8 + j]);
                        let mut magnitude = exact.abs();
                        for k in 0..16 {
                            let p =
                                f64::from(value(a[w * 256 + i * 16 + k])) * f64::from(value(b[w * 128 + k * 8 + j]));
                            exact += p;
                            magnitude += p.abs();
                        }
                        let got = f64::from(d[w * 128 + i * 8 + j]);
                        assert!(
                            (got - exact).abs() <= 1e-6 * magnitude,
                            "{name} bf16={is_bf16} warp {w} D[{i}][{j}] = {got}, expected {exact}"
                        );
                    }
                }
            }
            match &first {
                None => first = Some(d),
                Some(f) => assert!(
                    f.iter().zip(&d).all(|(x, y)| x.to_bits() == y.to_bits()),
                    "{name}: result differs from the forward schedule"
                ),
            }
        }
    }
}

// ---- wgmma ---------------------------------------------------------------------------------

/// wgmma.mma_async as the Hopper forward kernel uses it (kernels/hopper/wgmma_probe.cu): S = Q K^T
/// (K-major B, N 64, 8 k-steps of D 128) and O = P V (MN-major B, N 128 or 64 for D 128 or 64, 4
/// k-steps of 64 keys), from a tile in the kernel's shared-memory layout, against a plain matmul;
/// partial k-steps too.
/// Without the wait, the queued ops never land (D keeps C): the emulator's asynchrony.
#[test]
fn wgmma_matches_plain_matmul() {
    for is_bf16 in [true, false] {
        let to_bits: fn(f32) -> u16 = if is_bf16 { bf16_bits } else { f16_bits };
        let value: fn(u16) -> f32 = if is_bf16 { bf16_value } else { f16_value };
        for (mode, k_steps) in [(0usize, 8usize), (0, 3), (1, 4), (1, 1), (2, 4)] {
            let n = if mode == 1 { 128 } else { 64 };
            let ka = 16 * k_steps;
            let mut rng = Lcg(11 + mode as u64 + 2 * k_steps as u64 + 100 * u64::from(is_bf16));
            let a: Vec<u16> = (0..64 * ka).map(|_| to_bits(rng.next() * 4.0)).collect();
            let tile: Vec<u16> = (0..64 * 128).map(|_| to_bits(rng.next() * 4.0)).collect();
            let c: Vec<f32> = (0..64 * n).map(|_| rng.next() * 8.0).collect();
            // B[k][j]: K-major reads the tile's row j, MN-major its row k.
            let b = |k: usize, j: usize| {
                value(if mode == 0 {
                    tile[j * 128 + k]
                } else {
                    tile[k * 128 + j]
                })
            };
            // D of one launch, waiting for the ops or not.
            let run = |skip_wait: bool| -> Result<Vec<f32>, String> {
                let mut d = vec![f32::NAN; 64 * n];
                check(unsafe {
                    segattn_emu_test_wgmma(
                        mode as c_int,
                        is_bf16 as c_int,
                        a.as_ptr(),
                        tile.as_ptr(),
                        c.as_ptr(),
                        d.as_mut_ptr(),
                        k_steps as c_int,
                        skip_wait as c_int,
                    )
                })?;
                Ok(d)
            };
            for (schedule, seed, name) in [SCHEDULES[0], SCHEDULES[3], SCHEDULES[7]] {
                set_schedule(schedule, seed);
                let d = run(false).unwrap_or_else(|e| panic!("{name} mode {mode}: {e}"));
                for i in 0..64 {
                    for j in 0..n {
                        let mut exact = f64::from(c[i * n + j]);
                        let mut magnitude = exact.abs();
                        for k in 0..ka {
                            let p = f64::from(value(a[i * ka + k])) * f64::from(b(k, j));
                            exact += p;
                            magnitude += p.abs();
                        }
                        let got = f64::from(d[i * n + j]);
                        assert!(
                            (got - exact).abs() <= 1e-6 * magnitude,
                            "{name} bf16={is_bf16} mode {mode} k_steps {k_steps}: D[{i}][{j}] = {got}, expected {exact}"
                        );
                    }
                }
            }
            set_schedule(FORWARD, 0);
            let d = run(true).unwrap_or_else(|e| panic!("skip_wait mode {mode}: {e}"));
            assert!(
                d.iter().zip(&c).all(|(x, y)| x.to_bits() == y.to_bits()),
                "mode {mode}: without a wait the accumulators must keep C"
            );
        }
    }
}

// ---- ldmatrix -------------------------------------------------------------------------------

#[test]
fn ldmatrix_matches_direct_reads() {
    let src: Vec<u16> = (0..256u16).map(|i| i.wrapping_mul(257) ^ 0x5a5a).collect();
    // Matrix m of the x4 forms: rows 8*(m&1).., cols 8*(m>>1).. of the 16x16 source.
    let elem = |m: usize, r: usize, c: usize| src[(8 * (m & 1) + r) * 16 + 8 * (m >> 1) + c];
    for (mode, matrices, trans) in [(0, 4, false), (1, 4, true), (2, 2, false), (3, 2, true)] {
        for (schedule, seed, name) in SCHEDULES {
            set_schedule(schedule, seed);
            let mut out = vec![0u32; 32 * 4];
            check(unsafe { segattn_emu_test_ldmatrix(mode, src.as_ptr(), out.as_mut_ptr()) })
                .unwrap_or_else(|e| panic!("{name} mode {mode}: {e}"));
            for lane in 0..32 {
                for m in 0..4 {
                    let expected = if m >= matrices {
                        0
                    } else if !trans {
                        let (r, c) = (lane / 4, 2 * (lane % 4));
                        u32::from(elem(m, r, c)) | u32::from(elem(m, r, c + 1)) << 16
                    } else {
                        let (r, c) = (2 * (lane % 4), lane / 4);
                        u32::from(elem(m, r, c)) | u32::from(elem(m, r + 1, c)) << 16
                    };
                    assert_eq!(out[lane * 4 + m], expected, "{name} mode {mode}: lane {lane} r[{m}]");
                }
            }
        }
    }
    let mut out = vec![0u32; 32 * 4];
    let err = check(unsafe { segattn_emu_test_ldmatrix(4, src.as_ptr(), out.as_mut_ptr()) })
        .expect_err("a misaligned ldmatrix row address must fail the launch");
    assert!(err.contains("16-byte aligned"), "{err}");
}

// ---- cp.async -------------------------------------------------------------------------------

#[repr(C, align(16))]
#[derive(Clone, Copy, PartialEq, Debug)]
struct Chunk([u8; 16]);

const CHUNKS: usize = 64;

fn cp_async_run(mode: c_int, src: &[Chunk]) -> Result<Vec<Chunk>, String> {
    let mut out = vec![Chunk([0x11; 16]); 3 * CHUNKS];
    check(unsafe { segattn_emu_test_cp_async(mode, src.as_ptr().cast(), out.as_mut_ptr().cast()) })?;
    Ok(out)
}

#[test]
fn cp_async_matches_direct_copy_and_exposes_a_missing_wait() {
    let src: Vec<Chunk> = (0..2 * CHUNKS)
        .map(|c| Chunk(std::array::from_fn(|i| (c * 16 + i) as u8 ^ 0x3c)))
        .collect();
    // What a synchronous copy gives: chunk t, or zeros where the predicate is off (t % 5 == 3).
    let expected = |t: usize| {
        if t % CHUNKS % 5 == 3 {
            Chunk([0; 16])
        } else {
            src[t]
        }
    };
    let poison = Chunk([0xff; 16]);
    for (schedule, seed, name) in SCHEDULES {
        set_schedule(schedule, seed);
        let out = cp_async_run(0, &src).unwrap_or_else(|e| panic!("{name}: {e}"));
        for (t, chunk) in out.iter().take(CHUNKS).enumerate() {
            assert_eq!(*chunk, expected(t), "{name}: chunk {t}");
        }

        // Without the wait nothing has landed: the NaN poison is still there.
        let out = cp_async_run(1, &src).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            (0..CHUNKS).all(|t| out[t] == poison),
            "{name}: a missing cp.async wait must leave the poison"
        );

        // wait_group 1 completes the older group only.
        let out = cp_async_run(2, &src).unwrap_or_else(|e| panic!("{name}: {e}"));
        for t in 0..CHUNKS {
            assert_eq!(out[t], expected(t), "{name}: group 0 chunk {t}");
            assert_eq!(out[CHUNKS + t], poison, "{name}: group 1 still in flight");
            assert_eq!(out[2 * CHUNKS + t], expected(CHUNKS + t), "{name}: group 1 chunk {t}");
        }
    }
    let err = cp_async_run(3, &src).expect_err("a misaligned cp.async must fail the launch");
    assert!(err.contains("16-byte aligned"), "{err}");
    // Two copies in flight into the same bytes: a race on a GPU (either may land last).
    let err = cp_async_run(4, &src).expect_err("a second copy into bytes still being copied must fail");
    assert!(err.contains("overlaps a copy still in flight"), "{err}");
}

#[test]
fn wgmma_after_cp_async_needs_the_proxy_fence() {
    // kernels/emu/tests/proxy_fence_test.cu: cp.async fills wgmma's B; each copying thread must
    // issue fence.proxy.async after its copies land and before the barrier.
    let tile: Vec<u16> = (0..64 * 64).map(|i| bf16_bits(1.0 + (i % 7) as f32)).collect();
    let run = |mode: c_int| {
        let mut out = vec![f32::NAN; 128 * 32];
        check(unsafe { segattn_emu_test_proxy_fence(mode, tile.as_ptr(), out.as_mut_ptr()) }).map(|()| out)
    };
    for (schedule, seed, name) in SCHEDULES {
        set_schedule(schedule, seed);
        let out = run(0).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(out.iter().all(|&x| x == 0.0), "{name}: A is zero, so D must be");
        for (mode, what) in [
            (1, "no fence"),
            (2, "the fence before the copies land"),
            (3, "half the threads fence"),
        ] {
            let err = run(mode).expect_err(what);
            assert!(err.contains("no fence.proxy.async"), "{name}, {what}: {err}");
        }
    }
}

// ---- shuffles, votes, reducing barriers ---------------------------------------------------

#[test]
fn shuffles_votes_and_barriers() {
    const OUTPUTS: usize = 17;
    let expected = |tid: i32, k: usize| -> i32 {
        let lane = tid % 32;
        let warp0 = tid - lane;
        let warp = warp0..warp0 + 32;
        match k {
            0 => warp.map(|t| t * 3 + 1).sum(),
            1 => warp.map(|t| t * 7 % 13).max().unwrap(),
            2 => (warp0 + 5) * 10,
            3 => warp0 + lane * 7 % 32,
            4 => {
                if lane >= 3 {
                    tid - 3
                } else {
                    tid
                }
            }
            5 => {
                if lane % 16 + 5 < 16 {
                    tid + 5
                } else {
                    tid
                }
            }
            // width 8: reading a later segment returns the own value.
            6 => {
                if lane & 8 != 0 {
                    tid ^ 8
                } else {
                    tid
                }
            }
            7 => 0x4924_9249,
            8 => (warp0 == 32) as i32,
            9 => (warp0 == 0) as i32,
            10 => 16,
            11 => 0,
            12 => 1,
            13 => 1,
            14 => 0,
            15 => {
                if lane < 16 {
                    tid ^ 1
                } else {
                    (tid ^ 2) + 1000
                }
            }
            _ => -1, // __activemask: the whole warp
        }
    };
    for (schedule, seed, name) in SCHEDULES {
        set_schedule(schedule, seed);
        let mut out = vec![i32::MIN; 64 * OUTPUTS];
        check(unsafe { segattn_emu_test_warp_ops(out.as_mut_ptr()) }).unwrap_or_else(|e| panic!("{name}: {e}"));
        for tid in 0..64 {
            for k in 0..OUTPUTS {
                assert_eq!(
                    out[tid * OUTPUTS + k],
                    expected(tid as i32, k),
                    "{name}: thread {tid} output {k}"
                );
            }
        }
    }
}

// ---- failures are reported, never hang -----------------------------------------------------

#[test]
fn deadlocks_and_misuse_fail_with_a_diagnosis() {
    // (mode, threads, fragments the message must contain)
    let cases: [(c_int, c_int, &[&str]); 9] = [
        (
            0,
            64,
            &[
                "deadlock",
                "__syncthreads",
                "failures_test.cu:",
                "threads 32-63: exited",
            ],
        ),
        (1, 32, &["deadlock", "__shfl_xor_sync", "waits for lanes 16-31"]),
        (2, 64, &["deadlock", "63 of 64 threads arrived", "threads 5: exited"]),
        (3, 64, &["__trap()", "thread (7,0,0)"]),
        (4, 32, &["waiting in a different", "__ballot_sync", "__shfl_xor_sync"]),
        (5, 48, &["needs all 32 lanes"]),
        (6, 64, &["deadlock", "threads 32-63: wait in __syncthreads"]),
        (
            7,
            64,
            &["wrote past the launch's 100 bytes of dynamic shared memory (at byte 100)"],
        ),
        (0, 2048, &["more than 1024 threads"]),
    ];
    for (schedule, seed, name) in SCHEDULES {
        set_schedule(schedule, seed);
        for (mode, threads, fragments) in cases {
            let mut out = vec![0; 2048];
            let err = check(unsafe { segattn_emu_test_failure(mode, threads, out.as_mut_ptr()) })
                .expect_err("the launch must fail");
            for f in fragments {
                assert!(err.contains(f), "{name} mode {mode}: {f:?} not in {err:?}");
            }
            // The emulator recovers: the next launch on this thread works.
            let mut ok = vec![0; 64 * 17];
            check(unsafe { segattn_emu_test_warp_ops(ok.as_mut_ptr()) })
                .unwrap_or_else(|e| panic!("{name}: launch after a failure: {e}"));
            assert_eq!(last_error(), "");
        }
    }
    // An invalid schedule is an error, not a silent default.
    set_schedule(42, 0);
    let mut out = vec![0; 64 * 17];
    let err = check(unsafe { segattn_emu_test_warp_ops(out.as_mut_ptr()) }).unwrap_err();
    assert!(err.contains("schedule"), "{err}");
}

// ---- proof that the emulator catches kernel bugs -------------------------------------------

const M: usize = 128;
const N: usize = 64;
const K: usize = 64;

struct MatmulProblem {
    a: Vec<u16>,
    b: Vec<u16>,
    exact: Vec<f64>,
    magnitude: Vec<f64>,
}

fn matmul_problem() -> MatmulProblem {
    let mut rng = Lcg(99);
    let a: Vec<u16> = (0..M * K).map(|_| bf16_bits(rng.next() * 2.0)).collect();
    let b: Vec<u16> = (0..K * N).map(|_| bf16_bits(rng.next() * 2.0)).collect();
    let mut exact = vec![0.0; M * N];
    let mut magnitude = vec![0.0; M * N];
    for i in 0..M {
        for j in 0..N {
            for k in 0..K {
                let p = f64::from(bf16_value(a[i * K + k])) * f64::from(bf16_value(b[k * N + j]));
                exact[i * N + j] += p;
                magnitude[i * N + j] += p.abs();
            }
        }
    }
    MatmulProblem { a, b, exact, magnitude }
}

fn try_run_matmul(p: &MatmulProblem, mode: c_int) -> Result<Vec<f32>, String> {
    let mut c = vec![0.0f32; M * N];
    check(unsafe {
        segattn_emu_test_tiled_matmul(
            mode,
            p.a.as_ptr(),
            p.b.as_ptr(),
            c.as_mut_ptr(),
            M as c_int,
            N as c_int,
            K as c_int,
        )
    })?;
    Ok(c)
}

fn run_matmul(p: &MatmulProblem, mode: c_int) -> Vec<f32> {
    try_run_matmul(p, mode).unwrap_or_else(|e| panic!("mode {mode}: {e}"))
}

fn matmul_is_correct(p: &MatmulProblem, c: &[f32]) -> bool {
    c.iter()
        .zip(p.exact.iter().zip(&p.magnitude))
        .all(|(&got, (&e, &m))| (f64::from(got) - e).abs() <= 1e-5 * m)
}

#[test]
fn tiled_matmul_correct_under_every_schedule_and_identical() {
    let p = matmul_problem();
    set_schedule(FORWARD, 0);
    let reference = run_matmul(&p, 0);
    assert!(matmul_is_correct(&p, &reference));
    for (schedule, seed, name) in SCHEDULES {
        set_schedule(schedule, seed);
        let c = run_matmul(&p, 0);
        assert!(matmul_is_correct(&p, &c), "{name}: wrong result");
        assert!(
            c.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits()),
            "{name}: result not bitwise identical across schedules"
        );
    }
}

#[test]
fn planted_bugs_are_caught() {
    let p = matmul_problem();
    // Caught: a wrong result, or the launch failing (the emulator's own checks).
    let caught_by = |mode: c_int| -> Vec<&'static str> {
        SCHEDULES
            .iter()
            .filter(|&&(schedule, seed, _)| {
                set_schedule(schedule, seed);
                try_run_matmul(&p, mode).map_or(true, |c| !matmul_is_correct(&p, &c))
            })
            .map(|&(_, _, name)| name)
            .collect()
    };
    let all: Vec<&str> = SCHEDULES.iter().map(|s| s.2).collect();
    // Missing __syncthreads after the tile load: other warps' rows are still NaN poison.
    assert_eq!(caught_by(1), all, "missing barrier after the load");
    // Missing trailing __syncthreads: only a warp running ahead into the next tile exposes it.
    let caught = caught_by(2);
    for name in ["low-first", "high-first", "random-warp/1", "random-warp/2"] {
        assert!(
            caught.contains(&name),
            "missing trailing barrier not caught by {name} (caught by {caught:?})"
        );
    }
    // Wrong fragment register, missing cp.async wait: wrong under every schedule (the missing
    // wait now fails the launch: the next tile's copy lands in bytes still being copied).
    assert_eq!(caught_by(3), all, "wrong fragment index");
    assert_eq!(caught_by(4), all, "missing cp.async wait");
    let err = try_run_matmul(&p, 4).expect_err("a missing cp.async wait");
    assert!(err.contains("overlaps a copy still in flight"), "{err}");
}

// ---- concurrency and cost ------------------------------------------------------------------

#[test]
fn concurrent_launches_from_several_threads() {
    let p = std::sync::Arc::new(matmul_problem());
    set_schedule(FORWARD, 0);
    let reference = run_matmul(&p, 0);
    let workers: Vec<_> = [FORWARD, HIGH_FIRST, RANDOM_WARP, RANDOM]
        .into_iter()
        .enumerate()
        .map(|(i, schedule)| {
            let p = p.clone();
            let reference = reference.clone();
            std::thread::spawn(move || {
                set_schedule(schedule, i as u64);
                for round in 0..6 {
                    let c = run_matmul(&p, 0);
                    assert!(
                        c.iter().zip(&reference).all(|(x, y)| x.to_bits() == y.to_bits()),
                        "thread {i} round {round}: result differs"
                    );
                    // A failing launch on this thread must not disturb the others.
                    let mut out = vec![0; 64];
                    let err = check(unsafe { segattn_emu_test_failure(0, 64, out.as_mut_ptr()) }).unwrap_err();
                    assert!(err.contains("deadlock"), "{err}");
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker thread panicked");
    }
}

#[test]
fn warp_collective_cost() {
    const ITERS: c_int = 2000;
    const WARPS: c_int = 4;
    for (schedule, name) in [(FORWARD, "forward"), (RANDOM_WARP, "random-warp")] {
        set_schedule(schedule, 3);
        let mut out = vec![0.0f32; 32 * WARPS as usize];
        let start = Instant::now();
        check(unsafe { segattn_emu_test_shuffle_loop(ITERS, WARPS, out.as_mut_ptr()) })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let per = start.elapsed().as_secs_f64() / f64::from(ITERS * WARPS);
        println!("{name}: {:.2} us per warp shuffle", per * 1e6);
        // Generous bound: only catches a pathological slowdown (e.g. a syscall per switch).
        assert!(per < 50e-6, "{name}: {:.1} us per warp collective", per * 1e6);
        assert!(out.iter().all(|v| v.is_finite()));
    }
}
