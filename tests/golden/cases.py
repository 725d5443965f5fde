"""The 20-step digits runs whose losses, teacher sequence and final weights are pinned bit for bit.

``record.py`` wrote ``steps.json`` from the code as it was before the method-registry refactor
(commit f71953f); ``tests/test_golden.py`` replays every case and compares. Bit for bit holds on CPUs
whose float32 kernels round as the recording machine's did; on others (another vector unit or oneDNN
path: seen on a later machine, the losses differed by at most 2.2e-7 relative) the discrete
sequences must still be equal and the numbers equal within a tolerance. ``weight_sums`` was added
later (recorded with the then-current code, which matched f71953f bit for bit on the first machine).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

BASE = [
    "data.name=digits",
    "data.train_subset=704",
    "data.val_size=64",
    "data.batch_size=32",  # 640 / 32 = 20 steps
    "optim.epochs=1",
    "optim.lr=0.05",
    "train.device=cpu",
    "train.precision=fp32",
    "train.progress=false",
    "train.tensorboard=false",
    "train.threads=1",
    "train.step_log=true",
    "seed=3",
]

CASES: dict[str, list[str]] = {
    "ind": ["models=[convnet,convnet]", "method.name=independent", "perturb.enabled=false"],
    "dml": ["models=[convnet,convnet]", "method.name=dml"],
    "cd": ["models=[convnet,convnet]", "method.name=cd", "method.beta=1.0", "perturb.ops=paper", "perturb.every=1"],
    "cd-code": ["models=[convnet,convnet,convnet]", "method.name=cd", "method.rule=better", "perturb.ops=code", "perturb.every=10"],
    "cd-clean-mutation": ["models=[convnet,convnet]", "method.name=cd", "method.selection=clean", "perturb.parameters.enabled=true",
                          "perturb.parameters.every=3"],
    "kd": ["models=[convnet,convnet]", "method.name=kd", "method.teacher_model=convnet"],
}


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def weight_sums(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per floating tensor: [sum, sum of absolute values] in float64 -- the final weights compared within a
    tolerance on CPUs whose kernels round differently from the recording machine's."""
    return {key: [float(v.double().sum()), float(v.double().abs().sum())]
            for key, v in sorted(state.items()) if v.dtype.is_floating_point}


def summarize(run_dir: Path, state: dict[str, torch.Tensor]) -> dict:
    """Per-step losses, teachers and perturbations (from the run's step log), the final weights' digest and sums."""
    records = [json.loads(line) for line in (run_dir / "steps.rank0.jsonl").read_text().splitlines()]
    return {"losses": [r["losses"] for r in records], "teachers": [r["teacher"] for r in records],
            "perturbations": [r["perturbation"] for r in records], "weights": weights_digest(state),
            "weight_sums": weight_sums(state)}
