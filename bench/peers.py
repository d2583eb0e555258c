#!/usr/bin/env python3
"""Times the peers of segattn on the shapes and masks of examples/gpu_bench.rs, with torch.

Peers (each where it applies):
  sdpa_flash   F.scaled_dot_product_attention, FLASH_ATTENTION backend (FlashAttention-2):
               causal and full only (is_causal), no other mask
  sdpa_cudnn   CUDNN_ATTENTION backend: causal / full through is_causal; other masks through a
               dense boolean attn_mask when the backend accepts one (else reported unsupported)
  sdpa_math    MATH backend with a dense boolean [L, L] mask built from the segment ids (every
               mask; skipped when its score matrices would not fit in memory)
  flex         torch.nn.attention.flex_attention (torch.compile'd) with a BlockMask built by
               create_block_mask from a mask_mod over the SAME segment ids and rule table as
               segattn; the BlockMask build time is reported separately (mask_build_ms) and is
               not in ms / tflops

Masks come from `gpu_bench --export-masks FILE` (segment ids, intra / inter rule, pair table and
the exact visible-pair count of every mask), so both sides run on identical masks.
Shapes: bf16, D 64 / 128, H 16 (Hkv 16) and GQA 32 / 8, B = tokens / L (16384 tokens; --smoke:
2048). Timing: CUDA events, warm-up, median of --reps (>= 20) repetitions, rotating over input
sets of at least 4x the device's L2 cache. TFLOP/s = 4 * D * H * visible pairs * B / time (visible pairs
only, as for segattn).

  peers.py --masks masks.json [--smoke] [--reps N] [--warmup N] [--filter S] [--json FILE]
           [--impls sdpa_flash,sdpa_cudnn,sdpa_math,flex] [--list] [--check]

Runs on CPU torch too (--smoke: tiny shapes; flash / cuDNN are then unavailable). --check
checks that the translated mask sees exactly segattn's visible pairs and compares flex and
sdpa_math outputs on every shape where both ran.

--backward: a training step instead (forward, then torch.autograd.grad of the output against a
fixed random output gradient: dq, dk, dv), on the shapes and masks of `gpu_bench --backward`
(causal, documents8, prefix_lm; L 2k and 8k, H 16 / 16, D 128; sdpa_math left out). TFLOP/s
then count 3.5x the forward's (the backward's five products against the forward's two, as
FlashAttention reports it).
"""

import argparse
import functools
import json
import math
import statistics
import sys
import time

L2_BYTES = 60 << 20  # when the device does not say (H100 50 MB, H200 60 MB)
MASKS = ["causal", "full", "documents8", "documents_ragged", "prefix_lm", "pine"]
IMPLS = ["sdpa_flash", "sdpa_cudnn", "sdpa_math", "flex"]
BACKWARD_MASKS = ["causal", "documents8", "prefix_lm"]


def shapes(smoke):
    tokens, lens = (2048, [256, 512]) if smoke else (16384, [1024, 2048, 4096, 8192, 16384])
    out = []
    for d in (64, 128):
        for h, hkv in ((16, 16), (32, 8)):
            for L in lens:
                out.append(dict(len=L, batch=tokens // L, heads=h, kv_heads=hkv, head_dim=d))
    # Head dim 256 (gpu_bench's list has the same shape): one length, H 16 / 16.
    L = 512 if smoke else 8192
    out.append(dict(len=L, batch=tokens // L, heads=16, kv_heads=16, head_dim=256))
    return out


def label(mask, s):
    return f"{mask} L{s['len']} B{s['batch']} H{s['heads']}/{s['kv_heads']} D{s['head_dim']}"


def segattn_rule(m, dev):
    """segattn's rule for mask `m` (an entry of `--export-masks`' JSON) as a function of query and
    key positions (tensors, broadcast): visible or not. The table entry of (id(q), id(k)) unless 3
    or out of the table, else intra for equal ids, inter otherwise; codes 0 blocked, 1 causal (key
    position <= query position), 2 full. Every mask is the same kind of data (a [S, S] table
    padded with 3 = "default" to a multiple of 32, intra / inter as tensors), so that
    torch.compile builds one FlexAttention kernel per shape, not one per mask."""
    import torch

    ids = torch.tensor(m["ids"], dtype=torch.int32, device=dev)
    given = m["table"] or []
    S = 32 * max(1, math.ceil(len(given) / 32))
    table = torch.full((S, S), 3, dtype=torch.int32)
    for i, row in enumerate(given):
        table[i, : len(row)] = torch.tensor(row, dtype=torch.int32)
    table = table.to(dev)
    intra = torch.tensor(m["intra"], dtype=torch.int32, device=dev)
    inter = torch.tensor(m["inter"], dtype=torch.int32, device=dev)

    def rule_visible(q_idx, kv_idx):
        sq, sk = ids[q_idx], ids[kv_idx]
        code = torch.where(sq == sk, intra, inter)
        inside = (sq < S) & (sk < S)
        t = table[sq.clamp(max=S - 1), sk.clamp(max=S - 1)]
        code = torch.where(inside & (t != 3), t, code)
        return (code == 2) | ((code == 1) & (kv_idx <= q_idx))

    return rule_visible


def compiled_flex():
    """flex_attention under torch.compile, allowed one compiled kernel per shape of a whole run:
    past dynamo's recompile limit (8 by default) a call silently falls back to eager
    FlexAttention, which materialises the scores (a CPU run of 16 shapes saw 100x slower times
    from its 9th shape on)."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 4096))
    return torch.compile(flex_attention, dynamic=False)


def dense_visible(rule_visible, L, dev):
    """The [L, L] boolean mask of `rule_visible` (True = visible)."""
    import torch

    return rule_visible(torch.arange(L, device=dev)[:, None], torch.arange(L, device=dev)[None, :])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--masks", help="JSON from gpu_bench --export-masks")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--filter")
    ap.add_argument("--json")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--backward", action="store_true", help="time forward + backward (see above)")
    ap.add_argument("--math-mem-frac", type=float, default=0.4,
                    help="skip sdpa_math when its estimated memory exceeds this fraction of free memory")
    a = ap.parse_args()

    selected = [(m, s) for s in shapes(a.smoke) for m in MASKS
                if not a.filter or a.filter in label(m, s)]
    if a.backward:
        # The shapes and masks of gpu_bench --backward.
        lens = (256,) if a.smoke else (2048, 8192)
        selected = [(m, s) for m, s in selected if m in BACKWARD_MASKS and s["len"] in lens
                    and s["heads"] == 16 and s["kv_heads"] == 16 and s["head_dim"] == 128]
        if a.check:
            ap.error("--check compares forward outputs: not with --backward")
    if a.list:
        for m, s in selected:
            print(label(m, s))
        return 0
    if not a.masks:
        ap.error("--masks FILE is required (gpu_bench --export-masks FILE)")
    if a.reps < 20 and not a.smoke:
        ap.error("--reps: at least 20 repetitions")
    impls = [i for i in a.impls.split(",") if i and not (a.backward and i == "sdpa_math")]
    for i in impls:
        if i not in IMPLS:
            ap.error(f"unknown impl {i}")

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    l2 = (getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) if cuda else 0) or L2_BYTES
    with open(a.masks) as f:
        masks = {(m["mask"], m["len"]): m for m in json.load(f)}

    flex_fn = create_block_mask = None
    if "flex" in impls:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            # Compiled on the GPU (the fast path); eager on the CPU smoke run.
            flex_fn = compiled_flex() if cuda else flex_attention
        except Exception as e:  # noqa: BLE001 - report, do not hide
            print(f"flex_attention unavailable: {e!r}", file=sys.stderr)

    meta = dict(meta=True, torch=torch.__version__, device=str(dev), backward=a.backward,
                name=torch.cuda.get_device_name(0) if cuda else "cpu",
                cuda=torch.version.cuda, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(json.dumps(meta))
    out_lines = [json.dumps(meta)]

    def write():
        if a.json:
            with open(a.json, "w") as f:
                f.write("\n".join(out_lines) + "\n")

    def timed(fn, sets):
        """Median ms of fn(*set) over reps, rotating sets, after warm-up."""
        for i in range(a.warmup):
            fn(*sets[i % len(sets)])
        if cuda:
            torch.cuda.synchronize()
            ev = []
            for i in range(a.reps):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn(*sets[i % len(sets)])
                e.record()
                ev.append((s, e))
            torch.cuda.synchronize()
            return statistics.median(s.elapsed_time(e) for s, e in ev)
        times = []
        for i in range(a.reps):
            t = time.perf_counter()
            fn(*sets[i % len(sets)])
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    print(f"{'impl':<11} {'shape':<40} {'ms':>10} {'TFLOP/s':>9} {'mask ms':>9}  status")
    for mask_name, s in selected:
        m = masks.get((mask_name, s["len"]))
        if m is None:
            print(f"no mask {mask_name} L{s['len']} in {a.masks}", file=sys.stderr)
            return 1
        B, L, H, Hkv, D = s["batch"], s["len"], s["heads"], s["kv_heads"], s["head_dim"]
        visible = m["visible_pairs"] * B
        flops = 4.0 * D * H * visible * (3.5 if a.backward else 1.0)
        rule_visible = segattn_rule(m, dev)

        set_bytes = 2 * B * L * (H + 2 * Hkv) * D
        nsets = max(2, min(16, math.ceil(4 * l2 / set_bytes)))
        gen = torch.Generator(device=dev).manual_seed(0)
        sets = [tuple(torch.randn(B, h, L, D, device=dev, dtype=torch.bfloat16, generator=gen)
                      .requires_grad_(a.backward) for h in (H, Hkv, Hkv)) for _ in range(nsets)]
        grad_out = torch.randn(B, H, L, D, device=dev, dtype=torch.bfloat16, generator=gen)

        def timed_step(run):
            """The forward alone, or with --backward forward + the gradients of q, k, v."""
            if not a.backward:
                return timed(run, sets)
            return timed(lambda q, k, v: torch.autograd.grad(run(q, k, v), (q, k, v), grad_out), sets)
        dense = None
        outputs = {}

        def record(impl, ms=None, status="ok", mask_ms=None, config=None):
            row = dict(impl=impl, mask=mask_name, len=L, batch=B, heads=H, kv_heads=Hkv, head_dim=D,
                       dtype="bf16", visible_pairs=visible, status=status, reps=a.reps)
            if config is not None:
                row["config"] = config
            if ms is not None:
                row.update(ms=round(ms, 5), tflops=round(flops / (ms * 1e-3) / 1e12, 2))
            if mask_ms is not None:
                row["mask_build_ms"] = round(mask_ms, 4)
            out_lines.append(json.dumps(row))
            ms_s = "" if ms is None else f"{ms:.3f}"
            tf_s = "" if ms is None else f"{row['tflops']:.1f}"
            mk_s = "" if mask_ms is None else f"{mask_ms:.2f}"
            print(f"{impl:<11} {label(mask_name, s):<40} {ms_s:>10} {tf_s:>9} {mk_s:>9}  {status}", flush=True)
            write()

        if a.check:
            # The translated rule must see exactly the pairs segattn counts.
            dense = dense_visible(rule_visible, L, dev)
            n = int(dense.sum().item())
            if n != m["visible_pairs"]:
                print(f"MISMATCH {label(mask_name, s)}: the mask_mod sees {n} pairs, segattn {m['visible_pairs']}")
                return 1
        causal_or_full = mask_name in ("causal", "full")
        for impl in impls:
            try:
                if impl in ("sdpa_flash", "sdpa_cudnn"):
                    if not cuda:
                        record(impl, status="unavailable (CPU)")
                        continue
                    backend = SDPBackend.FLASH_ATTENTION if impl == "sdpa_flash" else SDPBackend.CUDNN_ATTENTION
                    if causal_or_full:
                        kw = dict(is_causal=mask_name == "causal")
                    elif impl == "sdpa_cudnn":
                        if dense is None:
                            dense = dense_visible(rule_visible, L, dev)
                        kw = dict(attn_mask=dense)
                    else:
                        record(impl, status="unsupported mask (is_causal only)")
                        continue

                    def run(q, k, v, backend=backend, kw=kw):
                        with sdpa_kernel(backend):
                            return F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hkv, **kw)
                    outputs[impl] = run(*sets[0]).detach()
                    record(impl, timed_step(run))
                elif impl == "sdpa_math":
                    est = B * H * L * L * 4 * 3 + L * L
                    free = torch.cuda.mem_get_info()[0] if cuda else 8 << 30
                    if est > a.math_mem_frac * free:
                        record(impl, status=f"skipped (memory: ~{est / 2**30:.0f} GiB)")
                        continue
                    if dense is None:
                        dense = dense_visible(rule_visible, L, dev)

                    def run(q, k, v):
                        with sdpa_kernel(SDPBackend.MATH):
                            return F.scaled_dot_product_attention(q, k, v, attn_mask=dense, enable_gqa=H != Hkv)
                    outputs[impl] = run(*sets[0]).detach()
                    record(impl, timed_step(run))
                elif impl == "flex":
                    if flex_fn is None:
                        record(impl, status="unavailable")
                        continue

                    def mask_mod(b, h, q_idx, kv_idx):
                        return rule_visible(q_idx, kv_idx)

                    def build():
                        return create_block_mask(mask_mod, None, None, L, L, device=dev)
                    build()  # warm-up
                    builds = []
                    for _ in range(3):
                        sync()
                        t = time.perf_counter()
                        bm = build()
                        sync()
                        builds.append((time.perf_counter() - t) * 1e3)

                    def run(q, k, v, bm=bm, opts=None):
                        return flex_fn(q, k, v, block_mask=bm, enable_gqa=H != Hkv, kernel_options=opts)
                    config = None
                    try:
                        outputs[impl] = run(*sets[0]).detach()
                    except Exception as e:  # noqa: BLE001
                        # Inductor's default tiles for some shapes (D 64 with GQA on an H200) ask for
                        # more shared memory than the card has; its own advice: smaller blocks.
                        if "out of resource" not in str(e) and "No valid triton configs" not in str(e):
                            raise
                        opts = dict(BLOCK_M=64, BLOCK_N=64, num_stages=2)
                        config = "BLOCK_M 64, BLOCK_N 64, 2 stages (the default tiles exceed shared memory)"
                        torch._dynamo.reset()
                        run = functools.partial(run, opts=opts)
                        outputs[impl] = run(*sets[0]).detach()
                    record(impl, timed_step(run), mask_ms=statistics.median(builds), config=config)
            except Exception as e:  # noqa: BLE001 - a peer's failure is a result, not a crash
                msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
                record(impl, status=f"error: {type(e).__name__}: {msg}")
                if cuda:
                    torch.cuda.empty_cache()
        if a.check and "flex" in outputs and "sdpa_math" in outputs:
            # Rows that see no key: SDPA math gives NaN, flex gives 0; compare the rest.
            x, y = outputs["flex"].float(), outputs["sdpa_math"].float()
            ok = torch.isfinite(y)
            err = (x[ok] - y[ok]).abs().max().item() if ok.any() else 0.0
            status = "ok" if err < 3e-2 else "MISMATCH"
            print(f"check flex vs sdpa_math {label(mask_name, s)}: max abs diff {err:.4f} {status}", flush=True)
            out_lines.append(json.dumps(dict(check="flex_vs_math", mask=mask_name, len=L, head_dim=D,
                                             heads=H, kv_heads=Hkv, max_abs_diff=err, status=status)))
            write()
            if status != "ok":
                return 1
        del sets, dense, outputs
        if cuda:
            torch.cuda.empty_cache()
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
