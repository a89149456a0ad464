#!/usr/bin/env bash
# The one command that trains, exports and evaluates the adakv test model on a GPU machine.
#
#   bash tools/train/run_all.sh MODE CORPUS_DIR OUT_DIR
#
# MODE  smoke  tiny model on a 3 MB slice of the corpus (~1-2 min): every code path, nothing kept
#       real   tokenise the corpus, train, export, evaluate, package (~9 min)
#       all    tokenise once, smoke on it (stops here if it fails), then real; fits 9.5 minutes
# CORPUS_DIR  holds gutenberg-train-00.txt.xz and gutenberg-train-01.txt.xz
# OUT_DIR     what comes back: run.log always; for real/all also eval.json, model_card.md and
#             model.tar.part-aa, -ab, ... (the exported folder, tar split into 15 MiB parts)
#
# The training budget is what is left of TOTAL_S (default 560 s, counted from the start of this
# script) after data preparation and the smoke test, less RESERVE_S (default 95 s) for model
# start-up, export, evaluation and packaging. TRAIN_BUDGET_S overrides it. WORK (default
# /tmp/adakv-train) holds data, checkpoints and the export.
set -euo pipefail

MODE=${1:?usage: run_all.sh smoke|real|all CORPUS_DIR OUT_DIR}
CORPUS=${2:?corpus folder}
OUT=${3:?output folder}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOKENIZER=$ROOT/models/adakv-tiny-v1
WORK=${WORK:-/tmp/adakv-train}
TOTAL_S=${TOTAL_S:-560}
RESERVE_S=${RESERVE_S:-95}
EVAL_BUDGET_S=${EVAL_BUDGET_S:-75}
START=$(date +%s)
export PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$WORK"
LOG=$OUT/run.log
: >"$LOG"
PHASES=()

say() { echo "[run_all $(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
# Runs a command with its output in the log; records how long it took.
phase() {
  local name=$1; shift
  local t0; t0=$(date +%s)
  say "== $name: $*"
  "$@" 2>&1 | tee -a "$LOG"
  PHASES+=("$name $(($(date +%s) - t0))s")
  say "== $name done in $(($(date +%s) - t0)) s"
}

case $MODE in smoke|real|all) ;; *) echo "unknown mode $MODE" >&2; exit 2 ;; esac
shopt -s nullglob
FILES=("$CORPUS"/*.txt.xz)
[ ${#FILES[@]} -ge 2 ] || { say "no corpus .txt.xz files in $CORPUS"; exit 2; }
say "mode $MODE; corpus ${FILES[*]}; work $WORK; out $OUT"
python3 -c 'import torch, transformers, tokenizers, safetensors, numpy; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "| transformers", transformers.__version__, "| tokenizers", tokenizers.__version__, "| numpy", numpy.__version__)' 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader 2>&1 | tee -a "$LOG" || true

smoke() {  # $1 = data folder
  rm -rf "$WORK/smoke"
  phase smoke-train python3 "$HERE/train.py" --smoke --probe --data "$1" --tokenizer "$TOKENIZER" \
    --work "$WORK/smoke" --export "$WORK/smoke/export"
  phase smoke-eval python3 "$HERE/evaluate.py" --smoke --model "$WORK/smoke/export" --data "$1" \
    --out-json "$WORK/smoke/eval.json" --train-summary "$WORK/smoke/train_summary.json" \
    --card-out "$WORK/smoke/model_card.md"
}

if [ "$MODE" = smoke ]; then
  phase prepare python3 "$HERE/prepare_data.py" --tokenizer "$TOKENIZER" --out "$WORK/data_smoke" \
    --max-chars 3000000 "${FILES[@]}"
  smoke "$WORK/data_smoke"
  say "SMOKE OK; phases: ${PHASES[*]}"
  exit 0
fi

phase prepare python3 "$HERE/prepare_data.py" --tokenizer "$TOKENIZER" --out "$WORK/data" "${FILES[@]}"
if [ "$MODE" = all ]; then
  smoke "$WORK/data"
  say "smoke passed"
fi

ELAPSED=$(($(date +%s) - START))
BUDGET=${TRAIN_BUDGET_S:-$((TOTAL_S - ELAPSED - RESERVE_S))}
if [ "$BUDGET" -lt 60 ]; then say "only $BUDGET s left for training; using 60"; BUDGET=60; fi
say "training budget $BUDGET s (elapsed $ELAPSED s, total $TOTAL_S s, reserve $RESERVE_S s)"
rm -rf "$WORK/real"
EXPORT=$WORK/real/export/adakv-tiny-v1
phase train python3 "$HERE/train.py" --data "$WORK/data" --tokenizer "$TOKENIZER" --work "$WORK/real" \
  --export "$EXPORT" --time-budget-s "$BUDGET"
phase eval python3 "$HERE/evaluate.py" --model "$EXPORT" --data "$WORK/data" --out-json "$OUT/eval.json" \
  --train-summary "$WORK/real/train_summary.json" --card-out "$OUT/model_card.md" \
  --time-budget-s "$EVAL_BUDGET_S"

# The export must come back as files of at most 16 MiB: tar it and cut the tar into 15 MiB parts.
t0=$(date +%s)
tar -C "$(dirname "$EXPORT")" -cf "$WORK/real/model.tar" adakv-tiny-v1
rm -f "$OUT"/model.tar.part-*
split -b 15m "$WORK/real/model.tar" "$OUT/model.tar.part-"
PARTS=("$OUT"/model.tar.part-*)
[ ${#PARTS[@]} -le 6 ] || { say "too many parts: ${#PARTS[@]}"; exit 1; }
SHA=$(sha256sum "$WORK/real/model.tar" | cut -d' ' -f1)
PHASES+=("package $(($(date +%s) - t0))s")
say "export folder:"; ls -l "$EXPORT" | tee -a "$LOG"
say "returned files:"; ls -l "$OUT" | tee -a "$LOG"
say "phases: ${PHASES[*]}; total $(($(date +%s) - START)) s"
cat <<EOF | tee -a "$LOG"

==== adakv-tiny-v1 is trained ====
model.tar sha256 $SHA (${#PARTS[@]} parts)
To install the model in the repository (from the folder the returned files are in):
  cat model.tar.part-* > /tmp/model.tar
  echo "$SHA  /tmp/model.tar" | sha256sum -c
  tar -xf /tmp/model.tar -C models/          # -> models/adakv-tiny-v1/{config.json,model.safetensors,...}
  cp model_card.md models/README.md
Check: python3 -c "from transformers import AutoConfig; print(AutoConfig.from_pretrained('models/adakv-tiny-v1'))"
EOF
