#!/usr/bin/env bash
# Ours against PyTorch on the CPU, paired: the cases of `cargo bench --bench cpu_attention --
# --table` (B 1, H 8, D 64 / 128, N 512-4096; causal, documents, pine, full) and the decode steps
# of `cargo bench --bench cpu_decode` (H 32, Hkv 8, D 128, caches of 1k-16k tokens, back to back
# and from a cold cache), f32 and bf16. Ours (`--ours-json` of both benches) and the peers
# (bench/cpu_peers.py: torch SDPA, SDPA math and FlexAttention) run in alternating rounds on the
# same masks, so that a slow spell of this shared machine hits both; the table
# (bench/cpu_peers_report.py) keeps each side's best round.
#   SEGATTN_PEERS_ROUNDS  rounds (default 2)
#   SEGATTN_PEERS_PARTS   prefill,decode (default both)
#   SEGATTN_PEERS_FILTER  prefill cases whose "MASK DD NN DTYPE" contains it
#   SEGATTN_PEERS_OUT     the table (default bench/cpu_peers_table.md; raw JSON lines beside it in
#                         bench/cpu-peers-raw/)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${SEGATTN_PEERS_ROUNDS:-2}"
PARTS="${SEGATTN_PEERS_PARTS:-prefill,decode}"
OUT="${SEGATTN_PEERS_OUT:-bench/cpu_peers_table.md}"
RAW="$(dirname "$OUT")/cpu-peers-raw"
PY="$(bash scripts/install-cpu-peers.sh)"
filter=()
[ -n "${SEGATTN_PEERS_FILTER:-}" ] && filter=(--filter "$SEGATTN_PEERS_FILTER")
has() { case ",$PARTS," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

cargo bench --bench cpu_attention --bench cpu_decode --no-run
mkdir -p "$RAW"
rm -f "$RAW"/*.jsonl
has prefill && cargo bench --bench cpu_attention -- --export-masks "$RAW/masks.json"
for r in $(seq 1 "$ROUNDS"); do
  echo "=== round $r of $ROUNDS: ours ($(date +%T)) ===" >&2
  if has prefill; then cargo bench --bench cpu_attention -- --ours-json "$RAW/ours-$r.jsonl" "${filter[@]}"; fi
  if has decode; then cargo bench --bench cpu_decode -- --ours-json "$RAW/ours-decode-$r.jsonl"; fi
  echo "=== round $r of $ROUNDS: peers ($(date +%T)) ===" >&2
  if has prefill; then
    "$PY" bench/cpu_peers.py --masks "$RAW/masks.json" --json "$RAW/peers-$r.jsonl" "${filter[@]}"
  fi
  if has decode; then "$PY" bench/cpu_peers.py --decode --json "$RAW/peers-decode-$r.jsonl"; fi
done
rm -f "$RAW/masks.json"  # (regenerated from the code)
"$PY" bench/cpu_peers_report.py --commit "$(git rev-parse --short HEAD)" "$RAW"/*.jsonl >"$OUT"
echo "wrote $OUT" >&2
