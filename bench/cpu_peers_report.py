#!/usr/bin/env python3
"""The Markdown table of scripts/cpu-peers.sh: ours against PyTorch on the CPU, per case.

  cpu_peers_report.py [--commit REV] FILE.jsonl...

Reads the JSON lines of `cpu_attention -- --ours-json` and `cpu_decode -- --ours-json` (impl
"segattn") and of bench/cpu_peers.py (impls sdpa, sdpa_math, flex) from any number of rounds, keeps each impl's
fastest round per case (a slow spell of a shared machine only ever adds time), and prints one
row per case: the times, ours' speedup over each peer (> 1: ours faster), GFLOP/s of visible
pairs, and how far apart the rounds were; the decode steps in a table of their own. Ends with
the geometric mean speedups per mask.
"""

import argparse
import collections
import json
import math
import sys

PEERS = ["sdpa", "flex", "sdpa_math"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--commit", default="?")
    ap.add_argument("files", nargs="+")
    a = ap.parse_args()

    metas, rows = {}, collections.defaultdict(list)
    configs, errors = {}, {}
    for path in a.files:
        with open(path) as f:
            for line in f:
                r = json.loads(line)
                if r.get("meta"):
                    metas[r["impl"]] = r
                    continue
                key = (r["mask"], r["head_dim"], r["len"], r["dtype"])
                if "ms" in r:
                    rows[key + (r["impl"],)].append(r)
                    if "config" in r:
                        configs[r["impl"], r["mask"]] = r["config"]
                else:
                    errors[key + (r["impl"],)] = r.get("status", "no time")
    order = ["causal", "documents", "pine", "full", "decode", "decode_cold"]
    every = sorted({k[:4] for k in rows} | {k[:4] for k in errors},
                   key=lambda c: (order.index(c[0]), c[1], c[2], c[3]))
    cases = [c for c in every if not c[0].startswith("decode")]
    decode_cases = [c for c in every if c[0].startswith("decode")]
    if not every:
        print("no cases in the input", file=sys.stderr)
        return 1

    def best(case, impl):
        runs = rows.get(case + (impl,))
        return min(runs, key=lambda r: r["ms"]) if runs else None

    def spread(case, impl):
        runs = rows.get(case + (impl,), [])
        return max(r["ms"] for r in runs) / min(r["ms"] for r in runs) if len(runs) > 1 else 1.0

    ours_meta, torch_meta = metas.get("segattn", {}), metas.get("torch", {})
    print(f"CPU: {ours_meta.get('cpu', '?')}; ours {ours_meta.get('threads', '?')} threads (rayon), torch "
          f"{torch_meta.get('torch', '?')} {torch_meta.get('threads', '?')} threads (capability "
          f"{torch_meta.get('cpu_capability', '?')}); {torch_meta.get('date', '?')}; commit {a.commit}; "
          f"{max(len(v) for v in rows.values())} round(s), each side's fastest kept.")
    print()
    print("Speedup = peer ms / ours ms (> 1: ours faster). `spread` = slowest / fastest round of ours and "
          "of the (best) peer.")
    if cases:
        print()
        print("Prefill: B = 1, H = 8, Lq = Lk = N; inputs [B, N, H, D] for ours, [B, H, N, D] for torch (layouts "
              "not timed). GFLOP/s count visible (q, k) pairs only (4 D H visible / time).")
        print()
        print("| mask | D | N | dtype | visible % | ours ms | sdpa ms | flex ms | math ms | vs sdpa | vs flex "
              "| vs math | ours GFLOP/s | best peer GFLOP/s | spread |")
        print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    speedups = collections.defaultdict(list)
    for case in cases:
        mask, d, n, dtype = case
        ours = best(case, "segattn")
        peers = {p: best(case, p) for p in PEERS}
        any_row = ours or next((r for r in peers.values() if r), None)
        visible = 100.0 * any_row["visible_pairs"] / (n * n) if any_row else float("nan")

        def ms(r, impl):
            if r is not None:
                return f"{r['ms']:.2f}"
            return "err" if case + (impl,) in errors else ""

        def vs(p):
            r = peers[p]
            if ours is None or r is None:
                return ""
            s = r["ms"] / ours["ms"]
            speedups[mask, p].append(s)
            return f"{s:.2f}x" if s >= 1 else f"**{s:.2f}x**"

        timed_peers = [r for r in peers.values() if r]
        top = max(timed_peers, key=lambda r: r["gflops"]) if timed_peers else None
        spreads = [spread(case, "segattn")] + ([spread(case, top["impl"])] if top else [])
        cols = [mask, str(d), str(n), dtype, f"{visible:.1f}", ms(ours, "segattn"), ms(peers["sdpa"], "sdpa"),
                ms(peers["flex"], "flex"), ms(peers["sdpa_math"], "sdpa_math"), vs("sdpa"), vs("flex"),
                vs("sdpa_math"), f"{ours['gflops']:.1f}" if ours else "",
                f"{top['gflops']:.1f} ({top['impl']})" if top else "", " / ".join(f"{s:.2f}" for s in spreads)]
        print("| " + " | ".join(cols) + " |")
    print()
    if decode_cases:
        print()
        print("Decode steps (`cpu_decode -- --ours-json`, `cpu_peers.py --decode`): one query row, H 32, Hkv 8, "
              "D 128, a cache of L tokens; torch through enable_gqa. Both read the same head-major cache "
              "([1, Hkv, L, D]: ours through a transposed view, no copy); `token-major`: ours on a "
              "[1, L, Hkv, D] cache instead. `in L3`: back to back; `cold`: the caches evicted (64 MiB "
              "written, untimed) before each call. GB/s: K and V bytes read / time.")
        print()
        print("| L | dtype | cache | ours ms | ours token-major ms | sdpa ms | math ms | vs sdpa | vs math "
              "| ours GB/s | sdpa GB/s | spread |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for case in sorted(decode_cases, key=lambda c: (c[3], c[2], c[0])):
        mode, _, n, dtype = case
        ours, sdpa, math_ = best(case, "segattn"), best(case, "sdpa"), best(case, "sdpa_math")
        token_major = best(case, "segattn_token_major")

        def ratio(r):
            if ours is None or r is None:
                return ""
            s_ = r["ms"] / ours["ms"]
            speedups[mode, r["impl"]].append(s_)
            return f"{s_:.2f}x" if s_ >= 1 else f"**{s_:.2f}x**"

        cols = [str(n), dtype, "cold" if mode == "decode_cold" else "in L3",
                f"{ours['ms']:.3f}" if ours else "", f"{token_major['ms']:.3f}" if token_major else "",
                f"{sdpa['ms']:.3f}" if sdpa else "",
                f"{math_['ms']:.3f}" if math_ else "", ratio(sdpa), ratio(math_),
                f"{ours['gbps']:.1f}" if ours else "", f"{sdpa['gbps']:.1f}" if sdpa else "",
                " / ".join(f"{spread(case, i):.2f}" for i in ("segattn", "sdpa"))]
        print("| " + " | ".join(cols) + " |")
    print()
    print("Geometric mean of ours' speedup per mask (bold above: a peer faster):")
    print()
    print("| mask | vs sdpa | vs flex | vs math |")
    print("|---|---:|---:|---:|")
    for mask in order:
        cols = []
        for p in PEERS:
            v = speedups.get((mask, p))
            cols.append(f"{math.exp(sum(map(math.log, v)) / len(v)):.2f}x ({len(v)})" if v else "")
        if any(cols):
            print(f"| {mask} | " + " | ".join(cols) + " |")
    print()
    print("How torch ran each mask:")
    print()
    for (impl, mask), config in sorted(configs.items()):
        print(f"- {impl}, {mask}: {config}")
    for key, status in sorted(errors.items()):
        print(f"- {key[4]} failed on {key[0]} D{key[1]} N{key[2]} {key[3]}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
