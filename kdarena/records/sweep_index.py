"""``sweep.json``: the index of an experiment folder, rewritten after every run of a sweep.

The sweep's config file and overrides, its methods (label and the overrides that define it), the
seeds, and one entry per run: where it is, its status (pending, trained, resumed, restarted, skipped,
stopped, interrupted, failed), its wall time, the node (and GPUs) it trained on, its error. Runs and
methods of earlier sweeps into the same folder are kept. The same model writes the file and reads
the old one back.
"""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field


class _Entry(BaseModel):
    model_config = ConfigDict(extra="allow")


class SweepMethod(_Entry):
    label: str
    overrides: list[str] = Field(default_factory=list)


class SweepRun(_Entry):
    label: str
    seed: int
    run_dir: str
    status: str
    seconds: float = 0.0
    node: Optional[str] = None
    gpu: Optional[str] = None
    error: Optional[str] = None


class SweepIndex(BaseModel):
    model_config = ConfigDict(extra="allow")

    config: Optional[str] = None
    overrides: list[str] = Field(default_factory=list)
    methods: list[SweepMethod] = Field(default_factory=list)
    seeds: list[int] = Field(default_factory=list)
    runs: list[SweepRun] = Field(default_factory=list)

    def as_written(self) -> dict:
        """The file's data: a run's node, gpu and error only when it has them."""
        data = self.model_dump()
        for run in data["runs"]:
            for key in ("node", "gpu", "error"):
                if not run.get(key):
                    run.pop(key, None)
        return data
