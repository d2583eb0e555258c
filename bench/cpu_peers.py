#!/usr/bin/env python3
"""Times PyTorch's CPU attention on the cases of `cargo bench --bench cpu_attention -- --table`.

The peers of segattn's CPU path, each on the masks that `cpu_attention -- --export-masks FILE`
writes (segment ids, rule, exact visible-pair count), so that both sides run identical masks:
  sdpa       F.scaled_dot_product_attention as torch dispatches it on the CPU (its fused
             FlashAttention-style CPU kernel): causal through is_causal (upper tiles skipped),
             full with no mask, every other mask as a dense boolean [L, L] attn_mask (every
             tile computed, the mask applied inside)
  sdpa_math  the MATH backend with the dense boolean mask (scores materialised)
  flex       torch.nn.attention.flex_attention, torch.compile'd for the CPU (Inductor's CPU
             template), with a BlockMask built by create_block_mask from a mask_mod over the same
             segment ids and rule (masked blocks skipped); the BlockMask's build time is reported
             separately (mask_build_ms), not in ms
Cases: B 1, H 8, D 64 and 128, N 512 to 4096 (the masks' lengths), f32 and bf16, inputs
[B, H, N, D] contiguous, torch's own thread count (the machine's cores, as rayon's for ours).
Timing: one warm-up call (flex: after its compilation), then calls until at least 5 and 1 s
(at most 50); the median. GFLOP/s = 4 D H visible pairs / time (visible pairs only, as ours).
The share of the CPU that other processes took during a case is recorded (`foreign_load`).

  cpu_peers.py --masks masks.json [--json FILE] [--impls sdpa,sdpa_math,flex]
               [--dtypes f32,bf16] [--filter S] [--no-check]
  cpu_peers.py --decode [--json FILE] [--dtypes f32,bf16]

--decode: instead, the decode steps of `cargo bench --bench cpu_decode` (one query row, H 32,
Hkv 8, D 128, caches of 1k, 4k and 16k tokens, q [1, 32, 1, D], K / V [1, 8, L, D]): sdpa and
sdpa_math with enable_gqa (no mask: the row sees every key), back to back (`decode`) and with
the caches evicted before each call (`decode_cold`: 64 MiB written, untimed), as ours is timed.

Before timing, every case checks that the mask_mod sees exactly segattn's visible pairs, and
each peer's output against sdpa_math's (f32: 1e-4, bf16: 2e-2 absolute). scripts/cpu-peers.sh
runs this and ours in alternating rounds and writes the table (bench/cpu_peers_report.py).
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import compiled_flex, dense_visible, segattn_rule  # noqa: E402

HEADS, BATCH = 8, 1
HEAD_DIMS = (64, 128)
IMPLS = ["sdpa", "sdpa_math", "flex"]
TOLERANCE = {"f32": 1e-4, "bf16": 2e-2}
# Other processes above this share of the CPU: wait (at most QUIET_WAIT_S) before a case.
CONTENDED, QUIET_WAIT_S = 0.10, 30.0


class CpuLoad:
    """The share of the machine's CPU time that other processes used since construction
    (/proc/stat against this process's own times)."""

    def __init__(self):
        self.busy, self.total = self._stat()
        self.own = self._own()

    @staticmethod
    def _stat():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return busy, sum(v[:8])

    @staticmethod
    def _own():
        t = os.times()
        return (t.user + t.system) * os.sysconf("SC_CLK_TCK")

    def foreign(self):
        busy, total = self._stat()
        if total <= self.total:
            return 0.0
        other = (busy - self.busy) - (self._own() - self.own)
        return max(0.0, other / (total - self.total))


def wait_for_quiet():
    start = time.monotonic()
    while time.monotonic() - start < QUIET_WAIT_S:
        load = CpuLoad()
        time.sleep(0.5)
        if load.foreign() <= CONTENDED:
            return


def timed(fn, args, calls=(5, 50), warm_up_s=0.0, prepare=None):
    """Median ms of fn(*args) over at least calls[0] calls and 1 s (at most calls[1]), after one
    warm-up call (or warm_up_s of them), `prepare()` run untimed before each timed call; and how
    many calls it took."""
    start = time.perf_counter()
    fn(*args)
    while time.perf_counter() - start < warm_up_s:
        fn(*args)
    times = []
    start = time.perf_counter()
    while len(times) < calls[0] or (time.perf_counter() - start < 1.0 and len(times) < calls[1]):
        if prepare is not None:
            prepare()
        t = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


DECODE_HEADS, DECODE_KV_HEADS, DECODE_DIM, DECODE_LENS = 32, 8, 128, (1024, 4096, 16384)


def decode_rows(torch, dtypes, write_row):
    """The decode cases (see --decode above): a row each for sdpa and sdpa_math, warm and cold."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}
    evict = torch.ones(64 << 20, dtype=torch.uint8)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sdpa_math(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    for dtype in dtypes:
        for L in DECODE_LENS:
            gen = torch.Generator().manual_seed(0)
            q = torch.randn(1, DECODE_HEADS, 1, DECODE_DIM, generator=gen).to(torch_dtype[dtype])
            k, v = (torch.randn(1, DECODE_KV_HEADS, L, DECODE_DIM, generator=gen).to(torch_dtype[dtype]) for _ in range(2))
            cache_bytes = 2 * L * DECODE_KV_HEADS * DECODE_DIM * k.element_size()
            with torch.no_grad():
                reference = sdpa_math(q.float(), k.float(), v.float())
            for impl, fn in (("sdpa", sdpa), ("sdpa_math", sdpa_math)):
                for mode, cold in (("decode", False), ("decode_cold", True)):
                    row = dict(impl=impl, mask=mode, len=L, batch=1, heads=DECODE_HEADS, kv_heads=DECODE_KV_HEADS,
                               head_dim=DECODE_DIM, dtype=dtype, visible_pairs=L, config="enable_gqa, no mask")
                    with torch.no_grad():
                        err = (fn(q, k, v).float() - reference).abs().max().item()
                        row["max_abs_diff"] = err
                        if not err <= TOLERANCE[dtype]:
                            row["status"] = f"error: output differs from sdpa_math's in f32 by {err:.2e}"
                            write_row(row)
                            continue
                        wait_for_quiet()
                        load = CpuLoad()
                        ms, reps = timed(fn, (q, k, v), calls=(20, 200), warm_up_s=0.5,
                                         prepare=(lambda: evict.add_(1)) if cold else None)
                    row.update(ms=round(ms, 5), gflops=round(4.0 * DECODE_DIM * DECODE_HEADS * L / (ms * 1e-3) / 1e9, 2),
                               gbps=round(cache_bytes / (ms * 1e-3) / 1e9, 2), reps=reps,
                               foreign_load=round(load.foreign(), 3), status="ok")
                    write_row(row)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", help="JSON from cpu_attention -- --export-masks FILE")
    ap.add_argument("--decode", action="store_true", help="the decode steps instead (see above)")
    ap.add_argument("--json")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--filter")
    ap.add_argument("--no-check", action="store_true")
    a = ap.parse_args()
    impls = [i for i in a.impls.split(",") if i]
    for i in impls:
        if i not in IMPLS:
            ap.error(f"--impls: unknown impl {i} (expected some of {IMPLS})")
    dtypes = [d for d in a.dtypes.split(",") if d]
    for d in dtypes:
        if d not in TOLERANCE:
            ap.error(f"--dtypes: unknown dtype {d} (expected f32 and / or bf16)")

    if not a.decode and not a.masks:
        ap.error("--masks FILE is required (cpu_attention -- --export-masks FILE), or --decode")

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    dev = torch.device("cpu")
    meta = dict(meta=True, impl="torch", torch=torch.__version__, threads=torch.get_num_threads(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), date=time.strftime("%Y-%m-%d %H:%M:%S"))
    lines = [json.dumps(meta)]
    print(json.dumps(meta), flush=True)

    def write():
        if a.json:
            with open(a.json, "w") as f:
                f.write("\n".join(lines) + "\n")

    if a.decode:
        def write_row(row):
            lines.append(json.dumps(row))
            shown = f"{row['ms']:.3f} ms, {row['gbps']:.1f} GB/s" if "ms" in row else row["status"]
            print(f"{row['impl']:<10} {row['mask']} L{row['len']} {row['dtype']:<5} {shown}", flush=True)
            write()
        decode_rows(torch, dtypes, write_row)
        return 0

    flex_fn = compiled_flex()
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}
    with open(a.masks) as f:
        masks = json.load(f)

    for m in masks:
        name, L = m["mask"], m["len"]
        rule_visible = segattn_rule(m, dev)
        dense = dense_visible(rule_visible, L, dev)
        if int(dense.sum()) != m["visible_pairs"]:
            print(f"MISMATCH {name} N{L}: the mask_mod sees {int(dense.sum())} pairs, segattn "
                  f"{m['visible_pairs']}", file=sys.stderr)
            return 1

        def mask_mod(b, h, q_idx, kv_idx):
            return rule_visible(q_idx, kv_idx)

        block_mask, builds = None, []
        for d in HEAD_DIMS:
            for dtype in dtypes:
                label = f"{name} D{d} N{L} {dtype}"
                if a.filter and a.filter not in label:
                    continue
                gen = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(BATCH, HEADS, L, d, generator=gen).to(torch_dtype[dtype]) for _ in range(3))
                flops = 4.0 * d * HEADS * BATCH * m["visible_pairs"]
                if name == "causal":
                    sdpa_kw, sdpa_config = dict(is_causal=True), "is_causal"
                elif name == "full":
                    sdpa_kw, sdpa_config = {}, "no mask"
                else:
                    sdpa_kw, sdpa_config = dict(attn_mask=dense), "dense bool mask"
                choice = torch._fused_sdp_choice(q, k, v, **sdpa_kw)
                sdpa_config += f", backend {SDPBackend(choice).name}"

                def sdpa(q, k, v):
                    return F.scaled_dot_product_attention(q, k, v, **sdpa_kw)

                def sdpa_math(q, k, v):
                    with sdpa_kernel(SDPBackend.MATH):
                        return F.scaled_dot_product_attention(q, k, v, attn_mask=dense)

                if "flex" in impls and block_mask is None:
                    create_block_mask(mask_mod, None, None, L, L, device="cpu")  # warm-up
                    for _ in range(3):
                        t = time.perf_counter()
                        block_mask = create_block_mask(mask_mod, None, None, L, L, device="cpu")
                        builds.append((time.perf_counter() - t) * 1e3)

                def flex(q, k, v):
                    return flex_fn(q, k, v, block_mask=block_mask)

                runs = dict(sdpa=(sdpa, sdpa_config), sdpa_math=(sdpa_math, "MATH, dense bool mask"),
                            flex=(flex, "torch.compile, BlockMask"))
                reference = None
                if not a.no_check:
                    with torch.no_grad():
                        reference = sdpa_math(q.float(), k.float(), v.float())
                for impl in impls:
                    fn, config = runs[impl]
                    row = dict(impl=impl, mask=name, len=L, batch=BATCH, heads=HEADS, head_dim=d, dtype=dtype,
                               visible_pairs=m["visible_pairs"], config=config)
                    try:
                        with torch.no_grad():
                            out = fn(q, k, v)  # (flex: compiles here)
                            if reference is not None:
                                err = (out.float() - reference).abs().max().item()
                                row["max_abs_diff"] = err
                                if not err <= TOLERANCE[dtype]:
                                    raise RuntimeError(f"output differs from sdpa_math's by {err:.2e}")
                            wait_for_quiet()
                            load = CpuLoad()
                            ms, reps = timed(fn, (q, k, v))
                        row.update(ms=round(ms, 5), gflops=round(flops / (ms * 1e-3) / 1e9, 2), reps=reps,
                                   foreign_load=round(load.foreign(), 3), status="ok")
                        if impl == "flex":
                            row["mask_build_ms"] = round(statistics.median(builds), 4)
                    except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
                        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                        row["status"] = f"error: {type(e).__name__}: {msg}"
                    lines.append(json.dumps(row))
                    shown = f"{row['ms']:.3f} ms, {row['gflops']:.1f} GFLOP/s" if "ms" in row else row["status"]
                    print(f"{impl:<10} {label:<28} {shown}", flush=True)
                    write()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
