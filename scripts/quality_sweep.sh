#!/usr/bin/env bash
# The quality table of docs/quality.md: every policy x budgets 64..1024 x both protocols on the
# shipped model, needle-in-a-haystack and the RULER-style tasks, split over JOBS processes
# (`--shard I/N`; each process writes its rows as samples finish, so a stopped sweep keeps what
# it did). Then merged tables (tools/eval_table.py) and plots (tools/plot_eval.py).
#
# Usage: scripts/quality_sweep.sh [OUTDIR] [JOBS]       (ADAKV=path/to/adakv to choose the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-out/quality}
jobs=${2:-$(nproc)}
adakv=${ADAKV:-build/adakv}
model=models/adakv-tiny-v1
policies=full,streamingllm,h2o,snapkv,ada-snapkv,pyramidkv,ada-pyramidkv,criticalkv,ada-criticalkv,kvcompress
budgets=64,128,256,512,1024
needle_lengths=${NEEDLE_LENGTHS:-1024,2048,4096,8160}  # 8160 + 32 new tokens = the 8K context
needle_samples=${NEEDLE_SAMPLES:-1}
ruler_lengths=${RULER_LENGTHS:-2048}
ruler_samples=${RULER_SAMPLES:-3}
mkdir -p "$out"
status=0

common=(--model "$model" --policies "$policies" --budgets "$budgets" --protocol both)
pids=()
# Needle shards, then RULER shards, JOBS processes each; a failing shard does not stop the others.
for ((i = 0; i < jobs; i++)); do
  ADAKV_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$adakv" eval needle "${common[@]}" --lengths "$needle_lengths" \
    --num-depths 5 --samples "$needle_samples" --shard "$i/$jobs" --out "$out/needle.$i" >"$out/needle.$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
pids=()
for ((i = 0; i < jobs; i++)); do
  ADAKV_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 "$adakv" eval ruler "${common[@]}" --lengths "$ruler_lengths" \
    --samples "$ruler_samples" --shard "$i/$jobs" --out "$out/ruler.$i" >"$out/ruler.$i.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || status=1; done
[ "$status" = 0 ] || echo "quality_sweep: some shards failed; see $out/*.log" >&2

python3 tools/eval_table.py "$out"/needle.*.csv --merged "$out/needle.csv" >"$out/needle.md"
python3 tools/eval_table.py "$out"/ruler.*.csv --merged "$out/ruler.csv" >"$out/ruler.md"
cat "$out/needle.md" "$out/ruler.md"
exit $status
