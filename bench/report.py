#!/usr/bin/env python3
"""Merges gpu_bench and peers.py results (JSON lines) into one markdown table.

  report.py --ours segattn.jsonl --peers peers.jsonl [--header summary.md] [--out RESULTS.md]

One row per shape: segattn kernel TFLOP/s (and ms), segattn whole-call TFLOP/s, each peer's
TFLOP/s with the ratio segattn kernel / peer, FlexAttention's BlockMask build time. TFLOP/s count
visible (q, k) pairs only. Then the issue's targets (H100, bf16, D 128, L 8k, H 16), checked.
"""

import argparse
import json
import os
import sys

PEERS = ["sdpa_flash", "sdpa_cudnn", "sdpa_math", "flex"]
MASKS = ["causal", "full", "documents8", "documents_ragged", "prefix_lm", "pine"]


def load(path):
    rows, meta = [], {}
    if not path or not os.path.exists(path):
        return rows, meta
    for line in open(path):
        line = line.strip()
        if not line:
            continue
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if r.get("meta"):
            meta = r
        elif "impl" in r:
            rows.append(r)
    return rows, meta


def key(r):
    return (r["head_dim"], r["heads"], r["kv_heads"], r["len"], MASKS.index(r["mask"]) if r["mask"] in MASKS else 99,
            r["mask"], r["batch"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ours", required=True)
    ap.add_argument("--peers")
    ap.add_argument("--header")
    ap.add_argument("--out")
    a = ap.parse_args()
    ours, _ = load(a.ours)
    peers, meta = load(a.peers)
    by = {}
    for r in ours + peers:
        by.setdefault(key(r), {})[r["impl"]] = r

    out = []
    if a.header and os.path.exists(a.header):
        out += [open(a.header).read().rstrip(), ""]
    if meta:
        out.append(f"torch {meta.get('torch')} (CUDA {meta.get('cuda')}) on {meta.get('name')}, {meta.get('date')}")
        out.append("")
    out.append("TFLOP/s = 4 x D x H x visible (q, k) pairs / time (visible pairs only, for every implementation). "
               "segattn kernel: the kernel alone; whole call: `SegmentAttention::forward` with the mask metadata. "
               "xN = segattn kernel / peer. Flex: its BlockMask build time apart (not in its TFLOP/s).")
    out.append("")
    out.append("| shape | kernel TFLOP/s (ms) | whole call | " + " | ".join(PEERS) + " | flex mask build ms |")
    out.append("|---|---|---|" + "---|" * len(PEERS) + "---|")

    def cell(r, base):
        if r is None:
            return ""
        if "tflops" not in r:
            return r.get("status", "")
        s = f"{r['tflops']:.0f}"
        if base:
            s += f" (x{base / r['tflops']:.2f})" if r["tflops"] > 0 else ""
        if r.get("config"):
            s += " [a]"  # a non-default configuration, explained below the table
        return s

    for k in sorted(by):
        d = by[k]
        o = d.get("segattn")
        base = o["tflops"] if o else None
        shape = f"{k[5]} L{k[3]} B{k[6]} H{k[1]}/{k[2]} D{k[0]}"
        ours_cell = f"{o['tflops']:.0f} ({o['ms']:.3f})" if o else ""
        api = f"{o['api_tflops']:.0f}" if o else ""
        flex = d.get("flex")
        mask_ms = f"{flex['mask_build_ms']:.2f}" if flex and "mask_build_ms" in flex else ""
        out.append(f"| {shape} | {ours_cell} | {api} | " + " | ".join(cell(d.get(p), base) for p in PEERS)
                   + f" | {mask_ms} |")

    # The targets.
    def get(mask, impl):
        for k, d in by.items():
            if k[0] == 128 and k[1] == 16 and k[2] == 16 and k[3] == 8192 and k[5] == mask and impl in d:
                return d[impl].get("tflops")
        return None

    configs = sorted({f"{impl}: {r['config']}" for d in by.values() for impl, r in d.items()
                      if isinstance(r, dict) and r.get("config")})
    if configs:
        out += [""] + [f"[a] {c}" for c in configs]

    out += ["", "Targets (bf16, D 128, L 8k, H 16; meant for H100):", ""]
    causal = get("causal", "segattn")

    def target(desc, value, ok):
        state = "n/a" if value is None else ("MET" if ok else "NOT MET")
        out.append(f"- {desc}: {'' if value is None else value} {state}")

    target("causal >= 330 TFLOP/s", causal, causal is not None and causal >= 330)
    flash = get("causal", "sdpa_flash")
    ratio = round(causal / flash, 2) if causal and flash else None
    target("causal >= 1.0x SDPA flash", ratio, ratio is not None and ratio >= 1.0)
    for m in ("documents8", "documents_ragged", "pine"):
        ours, flex = get(m, "segattn"), get(m, "flex")
        r = round(ours / flex, 2) if ours and flex else None
        target(f"{m} >= 1.2x FlexAttention", r, r is not None and r >= 1.2)
        eff = round(ours / causal, 2) if ours and causal else None
        target(f"{m} TFLOP/s >= 0.9x our causal", eff, eff is not None and eff >= 0.9)

    text = "\n".join(out) + "\n"
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
