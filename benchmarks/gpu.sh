#!/usr/bin/env bash
# GPU throughput of kdarena, one command, < 5 minutes on an H100/H200:
#   CIFAR-shaped synthetic data (50k uint8 3x32x32, batch 128), ResNet-32 x 2, ResNet-20 x 4 and WRN-16-2 x 2:
#   naive research-code loop vs kdarena's Trainer (loop) vs the fused vmapped group, fp32 vs bf16;
#   then CUDA graphs (torch.compile mode reduce-overhead) for the loop and the fused group, and a
#   64x64 200-class case (Tiny-ImageNet-shaped) with ResNet-20 x 2.
#   Reports step time, images/s, estimated epoch time (390 steps x median step), peak memory,
#   speed-up vs naive and group overhead; prints a table and writes ${OUT:-.}/gpu_throughput.json.
#
# Usage, from anywhere:   bash benchmarks/gpu.sh
#   PYTHON=...            interpreter (default: python); PYTHONPATH may point at extra wheels (pydantic)
#   DEVICE=cuda           device for benchmarks/throughput.py (cuda, cuda:1, cpu)
#   QUICK=1               dry run: one tiny group, 2 repetitions of 1 step (DEVICE=cpu QUICK=1 checks the script)
#   NO_COMPILE=1          skip the compile phase
# Each phase has a wall-clock cap (EAGER_TIMEOUT, COMPILE_TIMEOUT seconds) and all together BUDGET seconds
# (default 280); a phase cut short keeps the groups it finished (throughput.py writes its JSON after every
# group) and the summary says which phase is missing or incomplete.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python || command -v python3)}
DEVICE=${DEVICE:-cuda}
OUTDIR=${OUT:-.}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/kdarena-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

if [ "${QUICK:-0}" = 1 ]; then
  MODELS=resnet20x2; COMPILE_MODELS=resnet20x2
  COMMON="--reps 2 --steps 1 --warmup 1 --compile-warmup 1 --samples 2048"
  BUDGET=${BUDGET:-1500}; EAGER_TIMEOUT=${EAGER_TIMEOUT:-600}; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-400}
else
  MODELS=resnet32x2,resnet20x4,wrn16_2x2; COMPILE_MODELS=resnet32x2,resnet20x4
  COMMON="--reps 5 --steps 20 --warmup 3 --compile-warmup 5"
  BUDGET=${BUDGET:-290}; EAGER_TIMEOUT=${EAGER_TIMEOUT:-110}; COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-60}
fi
EAGER_VARIANTS=naive-w2,loop-fp32,loop-bf16,fused-fp32-nocl,fused-bf16,solo-fp32
# graph phases: each against the naive loop and its own eager baseline, timed in the same process
COMPILE_PHASES=("naive-w2,loop-fp32,loop-fp32-graphs" "naive-w2,fused-fp32-nocl,fused-fp32-nocl-graphs")

start=$(date +%s)
# cap = min(the phase's own cap, what is left of BUDGET seconds for the whole script)
cap() { local left=$(( BUDGET - ($(date +%s) - start) )); (( left < $1 )) && echo "$left" || echo "$1"; }

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"

T=$(cap "$EAGER_TIMEOUT")
echo "== eager: $MODELS ($EAGER_VARIANTS), cap ${T}s"
timeout -k 5 "$T" "$PY" benchmarks/throughput.py --device "$DEVICE" --models "$MODELS" \
  --variants "$EAGER_VARIANTS" $COMMON --json "$TMP/eager.json" || echo "!! eager phase exited with status $?"

PHASES=("$TMP/eager.json")
if [ "${NO_COMPILE:-0}" != 1 ]; then
  i=0
  for variants in "${COMPILE_PHASES[@]}"; do
    i=$((i + 1))
    T=$(cap "$COMPILE_TIMEOUT")
    if (( T < 30 )); then echo "!! no time left for compile phase $i ($variants)"; continue; fi
    echo "== compile $i: $COMPILE_MODELS ($variants), cap ${T}s"
    timeout -k 5 "$T" "$PY" benchmarks/throughput.py --device "$DEVICE" --models "$COMPILE_MODELS" \
      --variants "$variants" $COMMON --json "$TMP/compile$i.json" || echo "!! compile phase $i exited with status $?"
    PHASES+=("$TMP/compile$i.json")
  done
  T=$(cap "$COMPILE_TIMEOUT")
  if (( T >= 30 )); then
    echo "== 64x64, 200 classes: resnet20x2 (naive, loop, loop + graphs), cap ${T}s"
    timeout -k 5 "$T" "$PY" benchmarks/throughput.py --device "$DEVICE" --models resnet20x2 --image-size 64 --classes 200 \
      --variants naive-w2,loop-fp32,loop-fp32-graphs $COMMON --json "$TMP/px64.json" || echo "!! 64x64 phase exited with status $?"
    PHASES+=("$TMP/px64.json")
  else
    echo "!! no time left for the 64x64 phase"
  fi
fi

echo
echo "== summary (x base: pairwise median t_base/t against naive-w2 in every phase;"
echo "   overhead: t_group / sum t_solo at the same precision; epoch s = 390 steps x median step;"
echo "   peak MB = memory the variant keeps (incl. the 150 MB device-resident data set of Trainer variants) + its step peak)"
"$PY" benchmarks/throughput.py --merge "${PHASES[@]}" --json "$OUTDIR/gpu_throughput.json"
echo "total $(( $(date +%s) - start )) s"
