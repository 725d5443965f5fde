"""The training loop for a group: perturb -> forward -> the method's losses -> one backward -> step.

Plain and linear on purpose (torchvision references / nanoGPT style): :func:`build_parts` builds
everything, a :class:`Trainer` holds what a checkpoint must capture, ``fit`` runs epochs and
``train_step`` is one iteration, read top to bottom as named stages. The trainer never asks
which method it runs: the method declares its :class:`~kdarena.methods.Needs` and receives one
:class:`~kdarena.methods.StepInput` per step. The engine never sees the trainer: resume and
recovery get the parts and the :class:`~kdarena.engine.loop_state.LoopState` they act on. Only
rank 0 writes files or shows progress.
"""
from __future__ import annotations

import gc
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import Config, dump, to_dict
from .data.build import DataBundle
from .engine import checkpoint as ckpt, distributed as dist_utils, resume as resuming
from .engine.build import Parts, build_parts
from .engine.device_skip import DeviceSkip
from .engine.evaluate import autocast_context, epoch_line, evaluate_splits, resolve_precision, start_record
from .engine.loop_state import LoopState
from .engine.recovery import NonFiniteLossError, NonFinitePolicy
from .engine.stop_signals import Interrupted, install_stop_handlers
from .progress import progress_bar
from .engine.step_values import Packed, PendingValues, StepContext, StepValues, pack
from .losses import cross_entropy
from .group import Group
from .methods import GroupLosses, GroupMethod, StepInput
from .perturb import GroupBatchNormSnapshot, Perturbation, frozen_bn_stats
from .records.epoch import accuracy_key, selection_split
from .deploy.run_inputs import run_inputs
from .records.folder import MetricsLog, atomic_write_text, checkpoint_path, config_path, inputs_path, prepare, read_metrics, summary_path, write_json
from .records.summary import summarize
from .version import __version__

log = logging.getLogger("kdarena")

__all__ = ["Interrupted", "NonFiniteLossError", "Trainer", "train"]


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
                 parts: Parts | None = None, stop_requested: threading.Event | None = None):
        """``parts`` (from :func:`~kdarena.engine.build.build_parts`) replaces building them from ``config``;
        ``stop_requested`` set (from another thread) stops the run as SIGINT does: checkpoint, then Interrupted."""
        self.config = config
        self.stop_requested = stop_requested
        self.info = dist_utils.from_environment()
        self.device = dist_utils.resolve_device(config.train.device, self.info)
        dist_utils.init(self.info, self.device)
        self.is_main = self.info.is_main
        self.run_dir = Path(run_dir) if run_dir is not None else Path(config.output) / config.name
        # a resume may change only bookkeeping and resumable keys (refused before anything is built)
        self._resume_changes = resuming.check_overrides(self.run_dir, to_dict(config)) if resume else {}
        self.precision = resolve_precision(config.train.precision, self.device)
        if self.precision == "fp16" and self.device.type == "cpu":
            log.warning("fp16 autocast on CPU is slow; use train.precision=auto")
        if config.train.precision == "auto":
            log.info("train.precision=auto: %s on this %s", self.precision, self.device.type)

        self.parts = parts = parts if parts is not None else build_parts(config, self.device, self.info)
        self.n = len(self.group)
        self.needs = self.method.needs
        self.steps_per_epoch = len(self.data.train)
        self.loop = LoopState(self.n)
        # Read each step's numbers on the host every k steps (no device sync in between; k = 1: every step).
        self.host_every = config.host_every(self.device.type)
        self.pending = PendingValues()
        # train.nonfinite: the diverged networks' update undone on the device, then the policy when read
        self.device_skip = DeviceSkip([self.group.network_parameters(i) for i in range(self.n)], parts.optimizer)
        self.nonfinite = NonFinitePolicy(config.train.nonfinite, self.group.networks, parts.optimizer, config.models,
                                         self.data.num_classes, self.data.in_channels, self.device, self.run_dir)
        # A list records every step (tests); train.step_log also writes it to RUN_DIR/steps.rank<r>.jsonl.
        self.step_log: list[dict[str, Any]] | None = [] if config.train.step_log else None
        self._stop_signal: int | None = None
        # Only now, with everything built and validated, is the run directory created (or moved aside
        # with --force) and locked for the life of the run (released by fit, or on exit).
        self._run_lock = prepare(self.run_dir, resume=resume, force=force) if self.is_main else None
        dist_utils.barrier()
        try:
            if resume:
                resuming.restore(self.run_dir, config, parts, self.loop, self.device, self.is_main, self.info.world_size)
                if self.is_main:
                    resuming.record_resume(self.run_dir, self.loop.global_step, self._resume_changes)
            if self.is_main:
                atomic_write_text(config_path(self.run_dir), dump(config))  # a kill mid-write must not break --resume
                # what export and predict need of the data (shape, normalisation, class names), kept should it move
                write_json(inputs_path(self.run_dir), run_inputs(self.data).as_written())
            self.metrics = MetricsLog(self.run_dir, config.train.tensorboard, resume_epoch=self.loop.epoch if resume else None) if self.is_main else None
        except BaseException:
            self.release_run_dir()
            raise

    # the parts read on every step, by name (stored once, in self.parts)
    @property
    def data(self) -> DataBundle:
        return self.parts.data

    @property
    def group(self) -> Group:
        return self.parts.group

    @property
    def method(self) -> GroupMethod:
        return self.parts.method

    def release_run_dir(self) -> None:
        """Unlock the run directory (the run is over); another run may use it from now on."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.close()
            self._run_lock = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return checkpoint_path(self.run_dir).parent

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (exact resume: weights, optimizer, every RNG, the epoch's statistics)."""
        return resuming.capture(self.config, self.parts, self.loop, self.info.world_size)

    def save(self, name: str = "last.pt") -> None:
        self.read_pending()  # a checkpoint holds the epoch's statistics: every step must be counted first
        if self.is_main:
            ckpt.save_atomic(self.state_dict(), self.checkpoint_dir / name)
        dist_utils.barrier()

    # ------------------------------------------------------------------ one step
    def train_step(self, x: Tensor, y: Tensor, index: Tensor | None = None, views: list[Tensor] | None = None) -> dict[str, Any] | None:
        """One iteration on the batch (x, y); ``views``: the other networks' own augmentations of it (Needs.own_views).

        Returns the step's record, or None while its numbers wait on the device (``train.host_every`` > 1).
        """
        context = self._decide()
        inputs, targets = self._perturbed_inputs(x, y, context.perturbation, views)
        bn_stats = GroupBatchNormSnapshot(self.group.networks)  # a non-finite batch must not reach running statistics
        out = self._forward(inputs, context.perturbation)
        step = self._step_input(out, targets, x, y, context.perturbation, index)
        losses = self.method.losses(step)
        self._backward(losses)
        packed = self._pack(losses, out.logits, y)
        finite = packed.finite  # on the device: the diverged networks are left as they were, without waiting for the host
        bn_stats.restore_where(~finite)
        saved = self.device_skip.before_step(finite)
        self._optimizer_step()
        self.device_skip.after_step(finite, saved)
        self.method.after_step(self.group.networks, losses, step)
        self.pending.push(packed, context)
        return self.read_pending() if len(self.pending) >= self.host_every else None

    def _decide(self) -> StepContext:
        """This step's input perturbation and weight mutation (host-side seeded generators: no device sync)."""
        step, parts = self.loop.global_step, self.parts
        decision = parts.perturber.decide(step) if parts.perturber is not None else None
        mutated = parts.mutations.before_step(step, self.group.networks) if parts.mutations is not None else None
        return StepContext(step, decision, mutated)

    def read_pending(self) -> dict[str, Any] | None:
        """Read the steps whose numbers wait on the device (one transfer), apply train.nonfinite and account for them in order."""
        record = None
        for values, context in self.pending.drain():
            if values.nonfinite:
                self.nonfinite(values.nonfinite, values.teacher, context.step, self.loop.epoch, self.loop.stats)
            if self.parts.mutations is not None:  # (train.host_every=1: the next step's mutation is decided after this)
                self.parts.mutations.after_step(values.teacher, self.group.networks)
            record = self._account(values, context)
        return record

    def _account(self, values: StepValues, context: StepContext) -> dict[str, Any]:
        """Add a step to the epoch's statistics and the step log."""
        decision = context.perturbation
        self.loop.stats.add(values, decision)
        record = {"step": context.step, "teacher": values.teacher, "losses": values.losses, "mutated": context.mutated,
                  "perturbation": None if decision is None else (decision.network, decision.op, decision.lam)}
        if self.step_log is not None:
            self.step_log.append(record)
        return record

    def _perturbed_inputs(self, x: Tensor, y: Tensor, decision: Perturbation | None, views: list[Tensor] | None) -> tuple[Any, list]:
        """The group's inputs and per-network targets: one network may see a perturbed view (mixed target)."""
        own = [x, *views] if views else None  # network i's own augmentation of the batch
        if decision is None:
            return own if own else x, [y] * self.n
        # under torchrun each rank perturbs its own slice with its own noise (the decision is shared)
        perturber = self.parts.perturber
        generator = perturber.rank_generator(self.info.rank, self.loop.global_step, self.device) if self.info.enabled else None
        x_p, t_p = perturber.apply(decision, own[decision.network] if own else x, y, generator)
        inputs = [x_p if i == decision.network else (own[i] if own else x) for i in range(self.n)]
        return inputs, [t_p if i == decision.network else y for i in range(self.n)]

    def _forward(self, inputs: Any, decision: Perturbation | None):
        # perturb.bn_stats=freeze: the perturbed batch must not move that network's BatchNorm running statistics
        frozen = self.group.networks[decision.network] if decision is not None and self.config.perturb.bn_stats == "freeze" else None
        with autocast_context(self.device, self.precision), frozen_bn_stats(frozen):
            return self.parts.runner(inputs)

    def _step_input(self, out, targets: list, x: Tensor, y: Tensor, decision: Perturbation | None, index: Tensor | None) -> StepInput:
        return StepInput(
            logits=out.logits, targets=targets, features=out.features, extras=out.extras, adapt=self.group.adapt, x=x, y=y,
            perturbed=None if decision is None else decision.network,
            clean_ce=lambda i: self._clean_ce(x, y, i),
            reduce_mean=dist_utils.all_reduce_mean if self.info.enabled else None,
            autocast=lambda: autocast_context(self.device, self.precision),
            index=index, step=self.loop.global_step, epoch=self.loop.epoch,
            progress=self.loop.global_step / (self.steps_per_epoch * self.config.optim.epochs),
        )

    def _clean_ce(self, x: Tensor, y: Tensor, network: int) -> Tensor:
        """A network's CE on the clean batch (train mode, BN running statistics untouched)."""
        net = self.group.networks[network]
        with torch.no_grad(), autocast_context(self.device, self.precision), frozen_bn_stats(net):
            return cross_entropy(net(x), y).float()

    def _backward(self, losses: GroupLosses) -> None:
        self.parts.optimizer.zero_grad(set_to_none=True)
        self.parts.scaler.scale(losses.total).backward()

    def _pack(self, losses: GroupLosses, logits: list[Tensor], y: Tensor) -> Packed:
        if self.info.enabled:
            return pack(losses, logits, y, dist_utils.all_reduce_sum, self.info.world_size)
        return pack(losses, logits, y)

    def _optimizer_step(self) -> None:
        optimizer, scaler = self.parts.optimizer, self.parts.scaler
        scaler.unscale_(optimizer)
        clip = self.config.optim.grad_clip
        if clip:
            for i in range(self.n):
                torch.nn.utils.clip_grad_norm_(self.group.network_parameters(i), clip)
        scaler.step(optimizer)
        scaler.update()
        self.parts.scheduler.step()

    # ------------------------------------------------------------------ epochs
    def _on_signal(self, signum: int, frame) -> None:
        self._stop_signal = signum  # acted on after the step in progress: checkpoint, then Interrupted

    def _batches(self):
        """The epoch's batches from where it stopped, with sample indices when the method needs them."""
        loader = self.data.train
        if self.needs.sample_index or self.needs.own_views:
            for batch in loader.iterate_batches(self.loop.epoch, self.loop.batch_in_epoch, views=self.n if self.needs.own_views else 1):
                yield batch.x, batch.y, batch.index, batch.views
        else:
            for x, y in loader.iterate(self.loop.epoch, self.loop.batch_in_epoch):
                yield x, y, None, None

    def fit(self) -> dict[str, Any]:
        cfg, loop = self.config, self.loop
        previous_handlers = install_stop_handlers(self._on_signal)
        progress = None
        try:
            if loop.global_step == 0 and any(cfg.weights or []):  # where a run from weights starts: epoch 0
                self._log(start_record(self.group, self.method.eval_networks(), self.data, self.device, self.precision, self.is_main and cfg.train.progress))
            while loop.epoch < cfg.optim.epochs:
                self.group.train()
                start = time.perf_counter()
                if self.is_main and cfg.train.progress:  # a bar, or without a terminal a line every few seconds
                    progress = progress_bar(self.steps_per_epoch, f"epoch {loop.epoch + 1}/{cfg.optim.epochs}", loop.batch_in_epoch, "steps")
                t_step = time.perf_counter()
                for x, y, index, views in self._batches():
                    record = self.train_step(x, y, index, views)
                    loop.global_step += 1
                    loop.batch_in_epoch += 1
                    now = time.perf_counter()
                    loop.stats.seconds += now - t_step
                    if progress is not None:
                        if record is not None:
                            teacher = record["teacher"]
                            progress.set_postfix(loss=f"{sum(record['losses']) / self.n:.3f}", acc=f"{loop.stats.train_accuracy():.1f}",
                                                 teacher=teacher if teacher >= 0 else "-", refresh=False)
                        progress.update(1)
                    if self._after_step_io():
                        return {"stopped_at_step": loop.global_step}
                    t_step = time.perf_counter()
                self.read_pending()
                if progress is not None:
                    progress.close()
                    progress = None
                self._end_epoch(time.perf_counter() - start)
            return self.finish()
        finally:
            if progress is not None:
                progress.close()
            for sig, h in previous_handlers.items():
                signal.signal(sig, h)
            self._write_step_log()
            self.release_run_dir()

    def _after_step_io(self) -> bool:
        """Checkpoint on cadence; stop (True) at train.stop_after_steps; raise Interrupted on a signal."""
        cfg, loop = self.config, self.loop
        every = cfg.train.checkpoint_every_steps
        # (not at an epoch's last step: _end_epoch saves there, and saving twice would make last.prev.pt = last.pt)
        saved = bool(every) and loop.global_step % every == 0 and loop.batch_in_epoch < self.steps_per_epoch
        if saved:
            self.save()
        if cfg.train.stop_after_steps is not None and loop.global_step >= cfg.train.stop_after_steps:
            if not saved:
                self.save()
            return True
        if self._stop_signal is None and self.stop_requested is not None and self.stop_requested.is_set():
            self._stop_signal = signal.SIGINT  # e.g. a sweep's driver interrupted on another machine: as Ctrl-C here
        stop = self._stop_signal
        if self.info.enabled:
            flag = torch.tensor([float(stop or 0)], device=self.device)
            stop = int(dist_utils.all_reduce_max(flag).item()) or None
        if stop:
            if not saved:
                self.save()
            raise Interrupted(f"stopped by signal {stop} at step {loop.global_step}; resume with --resume {self.run_dir}", stop)
        return False

    def _write_step_log(self) -> None:
        """train.step_log (testing/debugging aid): append this rank's step records to RUN_DIR/steps.rank<r>.jsonl."""
        if not self.config.train.step_log or not self.step_log:
            return
        with open(self.run_dir / f"steps.rank{self.info.rank}.jsonl", "a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.step_log)
        self.step_log.clear()

    def _end_epoch(self, elapsed: float) -> None:
        cfg, loop = self.config, self.loop
        record: dict[str, Any] = {"epoch": loop.epoch, "step": loop.global_step, "lr": self.parts.optimizer.param_groups[0]["lr"]}
        record.update(loop.stats.record(teacher=self.method.has_teacher))
        if self.parts.mutations is not None:
            record.update(self.parts.mutations.pop_counts())
        record["epoch_seconds"] = elapsed
        last_epoch = loop.epoch + 1 == cfg.optim.epochs
        improved = False
        if (loop.epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            record.update(evaluate_splits(self.group, self.method.eval_networks(), self.data, self.device, self.precision, self.is_main and cfg.train.progress))
            scores = [record[accuracy_key(f"net{i}", selection_split(record))] for i in range(self.n)]
            for i in range(self.n):
                loop.best_val[i] = max(loop.best_val[i], scores[i])
            best_now = max(scores)
            if best_now > loop.best_val_any:
                loop.best_val_any, improved = best_now, True
        loop.history_seconds += elapsed
        record["wall_seconds"] = loop.history_seconds
        loop.next_epoch()
        self._log(record)
        if (loop.epoch % cfg.train.checkpoint_every == 0) or last_epoch:
            self.save()
        if improved:
            self.save("best.pt")

    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:  # every rank evaluated (the numbers are all-reduced); one writes
            self.metrics.write(record)
            log.info(epoch_line(record, self.n))

    def data_counts(self) -> dict[str, Any]:
        """What the run trained and was scored on: the class count and each split's number of images."""
        data = self.data
        count = lambda loader: len(loader.dataset) if loader is not None else 0  # noqa: E731
        return {"name": self.config.data.name, "classes": data.num_classes, "train_images": count(data.train),
                "val_images": count(data.val), "test_images": count(data.test)}

    def finish(self) -> dict[str, Any]:
        if not self.is_main:
            return {}
        # what it ran on: a study must not mix bf16 and fp32 runs, or machines, unknowingly
        summary = summarize(read_metrics(self.run_dir), self.n, run_dir=str(self.run_dir), config=to_dict(self.config),
                            version=__version__, world_size=self.info.world_size, precision=self.precision,
                            device=self.device.type, device_model=dist_utils.device_model(self.device),
                            torch=torch.__version__, data=self.data_counts()).as_written()
        write_json(summary_path(self.run_dir), summary)
        self.metrics.close()
        return summary


def train(config: Config, run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
          stop_requested: threading.Event | None = None) -> dict[str, Any]:
    """Train a group as configured and return the summary (the Python API behind ``kdarena train``); ``stop_requested``: see :class:`Trainer`."""
    trainer = Trainer(config, run_dir=run_dir, resume=resume, force=force, stop_requested=stop_requested)
    finished = False
    try:
        summary = trainer.fit()
        finished = True
        return summary
    finally:
        # Drop the DDP wrapper (and its reducer threads) before the process group goes away; wait for
        # the other ranks only after a clean finish (after an error they may never arrive).
        trainer.parts.runner = trainer.group
        gc.collect()
        dist_utils.shutdown(wait_for_peers=finished)
