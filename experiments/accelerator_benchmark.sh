#!/usr/bin/env bash
# The paper-size benchmark in one accelerator session of at most ~9 minutes, compile included:
#
#   bash experiments/accelerator_benchmark.sh OUT_DIR
#
# 1. A probe: T5 1.1 base cut to 2 of its layers, at the full run's batch, length and dtype, to
#    measure each method's compile time where it is cheap.
# 2. The full run (`experiments.benchmark`, T5 1.1 base, bfloat16, batch 128 x 128 tokens): all
#    methods when the probe's compile times, scaled to the real depth, fit what is left of
#    BUDGET_S; else only ft, levi and levi_cached (LEVI / FT and the cached-tap step). Each stage
#    runs under `timeout`, so the session ends on time with whatever finished written to OUT_DIR.
#
# Needs JAX, Flax, optax and NumPy only (no TensorFlow, seqio or gin). Environment overrides for a
# smoke test on CPU: PRESET, LAYERS_PROBE, BATCH, LENGTH, DTYPE, STEPS, BUDGET_S.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/levi_accelerator}}
PRESET=${PRESET:-t5_1_1_base}
LAYERS_PROBE=${LAYERS_PROBE:-2}
BATCH=${BATCH:-128}
LENGTH=${LENGTH:-128}
DTYPE=${DTYPE:-bfloat16}
STEPS=${STEPS:-10}
BUDGET_S=${BUDGET_S:-540}
PY=${PYTHON:-python}
mkdir -p "$OUT"
start=$(date +%s)
left() { echo $(( BUDGET_S - ($(date +%s) - start) )); }

common=(--preset "$PRESET" --batch "$BATCH" --length "$LENGTH" --dtype "$DTYPE")
echo "probe: $PRESET with $LAYERS_PROBE layers" | tee "$OUT/log.txt"
timeout $(( $(left) / 3 )) "$PY" -m experiments.benchmark "${common[@]}" \
    --num_layers "$LAYERS_PROBE" --steps 3 --warmup 1 --out "$OUT/probe.json" \
    >> "$OUT/log.txt" 2>&1 || echo "probe did not finish (rc $?)" | tee -a "$OUT/log.txt"

methods=ft,lora,levi,levi_lora,levi_cached
if [ -f "$OUT/probe.json" ]; then
  # Compile time grows about linearly with the (unrolled) depth: scale the probe's to the preset's.
  estimate=$("$PY" - "$OUT/probe.json" "$PRESET" "$LAYERS_PROBE" <<'EOF'
import json, sys
from levi_jax.models import t5_encoder
report, preset, probe_layers = json.load(open(sys.argv[1])), sys.argv[2], int(sys.argv[3])
scale = t5_encoder.PRESETS[preset].num_layers / probe_layers
print(int(sum(r["compile_s"] for r in report["train_step"].values()) * scale))
EOF
)
  echo "estimated compile time of the full run: ${estimate}s; ${BUDGET_S}s budget, $(left)s left" \
      | tee -a "$OUT/log.txt"
  if [ "${estimate:-999999}" -gt $(( $(left) / 2 )) ]; then
    methods=ft,levi,levi_cached
  fi
fi
echo "full run: $PRESET, methods $methods" | tee -a "$OUT/log.txt"
timeout $(( $(left) > 30 ? $(left) : 30 )) "$PY" -m experiments.benchmark "${common[@]}" \
    --methods "$methods" --steps "$STEPS" --warmup 2 --out "$OUT/bench.json" \
    >> "$OUT/log.txt" 2>&1 || echo "full run did not finish (rc $?)" | tee -a "$OUT/log.txt"
tail -n 25 "$OUT/log.txt"
