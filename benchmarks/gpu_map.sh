#!/usr/bin/env bash
# The map at GPU scale (issue "where does competition pay off"): the CPU map's small-data CIFAR-10 grid at a
# larger budget -- CIFAR ResNet-20 pairs on 5,000 training images (+1,000 for validation), 90 / 30 / 10 epochs
# (the over-fitting end first: the goal's methods and our variants, then the core of the arena), then full
# Tiny-ImageNet-32 (200 classes, 15 epochs) -- 3 seeds, several runs sharing the GPU (kdarena sweep --jobs).
# Sized for about 12 minutes on one H200 from the throughput measured there in an earlier session
# (ResNet-32 x 2 at ~5,300 img/s per run, ~3,400 img/s each with five runs at once); not yet run on a GPU:
# cells that do not fit are cut by the time cap and the same command continues them.
#
# Usage:  bash benchmarks/gpu_map.sh TINY_IMAGENET_ARCHIVE CIFAR10_ARCHIVE
#   PYTHON=...   interpreter (default: python); OUT=DIR where runs and map.md go (default: runs)
#   JOBS=8       concurrent runs;  BUDGET=720 seconds for all cells;  CELLS=... a subset (benchmarks/map.py)
set -u
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { echo "usage: bash benchmarks/gpu_map.sh TINY_IMAGENET_ARCHIVE CIFAR10_ARCHIVE" >&2; exit 2; }
PY=${PYTHON:-$(command -v python || command -v python3)}
OUTDIR=${OUT:-runs}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CELL_ARGS=()
[ -n "${CELLS:-}" ] && CELL_ARGS=(--cells "$CELLS")
timeout -k 10 "${BUDGET:-720}" "$PY" benchmarks/map.py --tiny-imagenet "$1" --cifar10 "$2" --scale gpu \
  --jobs "${JOBS:-8}" --out "$OUTDIR/map-gpu" "${CELL_ARGS[@]}" || echo "!! map stopped with status $? (time cap?)"
"$PY" benchmarks/map.py --tiny-imagenet "$1" --cifar10 "$2" --scale gpu --out "$OUTDIR/map-gpu" --report-only "${CELL_ARGS[@]}"
