#!/usr/bin/env bash
# Fashion-MNIST accuracy benchmark at GPU scale (issue "Experiments", item 6): the CPU benchmark's protocol
# (validation split of 5,000, two networks of one architecture, the same budget for every method) with
# deeper networks, more epochs and more seeds. Each method runs as its own process so that the small
# networks share the GPU; every method writes its own experiment folder and one report covers them all.
#   bash benchmarks/gpu_accuracy.sh            (env: MODELS, EPOCHS, SEEDS, METHODS, CAP seconds, PYTHON)
# A run cut off by CAP is left unfinished and the report covers the finished ones (it names the seeds).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
MODELS=${MODELS:-resnet32,resnet32}
EPOCHS=${EPOCHS:-12}
SEEDS=${SEEDS:-0,1,2,3,4}
METHODS=${METHODS:-independent dml cd cd-code cd-noperturb}
CAP=${CAP:-300}
DEVICE=${DEVICE:-cuda}
OUTDIR=${OUT:-runs}/fmnist-gpu
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
dirs=()
for method in $METHODS; do
  dirs+=("$OUTDIR/$method")
  timeout -k 5 "$CAP" "$PY" benchmarks/accuracy_fmnist.py --methods "$method" --seeds "$SEEDS" --epochs "$EPOCHS" \
    --models "$MODELS" --train-subset 60000 --out "$OUTDIR/$method" --threads 2 \
    train.device="$DEVICE" train.precision=bf16 train.channels_last=true \
    > "$OUTDIR/$method.log" 2>&1 &
done
wait
"$PY" -m kdarena report "${dirs[@]}" --out "$OUTDIR" || echo "!! report failed"
"$PY" -m kdarena plot "$OUTDIR" --out "$OUTDIR/plots" || echo "!! plot failed"
tail -n 3 "$OUTDIR"/*.log
