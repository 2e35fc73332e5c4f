#!/usr/bin/env bash
# The GPU benchmark suite, sized for one short lease of a GPU machine (about 9 minutes).
#
#   OUT=/tmp/gpu-results bash benchmarks/gpu_suite.sh [seconds]
#
# Runs, most important first, each under what is left of the time budget (default 540 s):
#   1. bench_fit --config sd15 --prompts 1, float32 (TF32 on both sides): the float32 speed and
#      device-memory goals at P=1;
#   2. bench_fit --config sd15 --prompts 1 8 32, bfloat16: the P-scaling table (prompts·steps/s,
#      memory per prompt, share of the measured bf16 matmul rate);
#   3. bench_models, float32: SD-1.5 UNet forward, VAE encode fwd+bwd;
#   4. bench_models, bfloat16;
#   5. bench_fit --config tiny --prompts 1 8 32.
# Each runs as a module from the repository root (`python3 -m benchmarks.NAME`).
# `SUITE=smoke` runs only a quick end-to-end check (tiny config, P=1) to try the environment.
# Each writes its log (JSON, then the tables) under $OUT. Python packages missing on the machine can be
# provided as wheels in .whl/ (installed into /tmp/site first).
set -u
OUT=${OUT:-/tmp/gpu-results}
mkdir -p "$OUT"
BUDGET=${1:-540}
END=$((SECONDS + BUDGET))
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export SDSJAX_CACHE=${SDSJAX_CACHE:-/tmp/sdsjax-cache}

{
  date -u; nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
  python3 -c "
import jax, flax, optax, chex, torch, diffusers, transformers
print('jax', jax.__version__, jax.devices(), '| flax', flax.__version__, '| optax',
      optax.__version__, '| chex', chex.__version__)
print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available()
      else 'no cuda', '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.txt"

step() {   # step NAME MAX_SECONDS COMMAND...: runs COMMAND within the budget left
  local name=$1 max=$2; shift 2
  local left=$((END - SECONDS))
  if [ "$left" -lt 45 ]; then echo "== $name: skipped, ${left}s left" | tee -a "$OUT/summary.txt"; return; fi
  [ "$left" -lt "$max" ] && max=$left
  echo "== $name (limit ${max}s): $*" | tee -a "$OUT/summary.txt"
  local t0=$SECONDS
  timeout "$max" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  # The tables (the end of stdout) go to the summary too.
  grep '^|' "$OUT/$name.log" >> "$OUT/summary.txt" || tail -5 "$OUT/$name.log" >> "$OUT/summary.txt"
}

if [ "${SUITE:-full}" = smoke ]; then
  step smoke_tiny 150 python3 -m benchmarks.bench_fit --config tiny --prompts 1 --repeats 1 \
    --memory none
  cat "$OUT/summary.txt"; exit 0
fi
step fit_sd15_fp32 150 python3 -m benchmarks.bench_fit --config sd15 --prompts 1 --steps 5 \
  --repeats 3 --impls sdsjax torch-batched --memory none --no-breakdown
step fit_sd15_bf16 270 python3 -m benchmarks.bench_fit --config sd15 --prompts 1 8 32 --steps 5 \
  --repeats 3 --dtype bfloat16 --impls sdsjax torch-batched --memory none --no-breakdown
step models_fp32 170 python3 -m benchmarks.bench_models --what unet vae --repeats 10
step models_bf16 100 python3 -m benchmarks.bench_models --what unet vae --repeats 10 \
  --dtype bfloat16
step fit_tiny 120 python3 -m benchmarks.bench_fit --config tiny --prompts 1 8 32 --repeats 3 \
  --memory none --no-breakdown
echo "== done in ${SECONDS}s" | tee -a "$OUT/summary.txt"
cat "$OUT/summary.txt"
