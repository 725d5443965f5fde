"""The training loop for a group: perturb -> forward -> the method's losses -> one backward -> step.

Plain and linear on purpose (torchvision references / nanoGPT style): :func:`build_parts` builds
everything, a :class:`Trainer` holds what a checkpoint must capture, ``fit`` runs epochs and
``train_step`` is one iteration, read top to bottom as named stages. The trainer never asks
which method it runs: the method declares its :class:`~kdarena.methods.Needs` and receives one
:class:`~kdarena.methods.StepInput` per step. Only rank 0 writes files or shows progress.
"""
from __future__ import annotations

import gc
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .config import Config, dump, to_dict
from .engine import checkpoint as ckpt, distributed as dist_utils, resume as resuming
from .engine.build import Parts, build_parts
from .engine.evaluate import autocast_context, evaluate, evaluate_network, resolve_precision
from .engine.recovery import NonFiniteLossError, handle_nonfinite
from .engine.runlog import MetricsLog, atomic_write_text, prepare, read_metrics, write_json
from .engine.stats import EpochStats, summarize
from .engine.device_skip import DeviceSkip
from .engine.step_values import Packed, PendingValues, StepValues, pack
from .losses import cross_entropy
from .methods import GroupLosses, StepInput
from .perturb import GroupBatchNormSnapshot, Perturbation, frozen_bn_stats
from .rng import keyed_seed

log = logging.getLogger("kdarena")

__all__ = ["Interrupted", "NonFiniteLossError", "Trainer", "summarize", "train"]


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once a checkpoint has been written."""


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: bool = False, force: bool = False,
                 parts: Parts | None = None):
        """``parts`` (from :func:`~kdarena.engine.build.build_parts`) replaces building them from ``config``."""
        self.config = config
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

        parts = parts if parts is not None else build_parts(config, self.device, self.info)
        self.parts = parts
        self.data, self.group, self.method = parts.data, parts.group, parts.method
        self.perturber, self.mutations = parts.perturber, parts.mutations
        self.optimizer, self.scheduler, self.scaler, self.model = parts.optimizer, parts.scheduler, parts.scaler, parts.runner
        self.n = len(self.group)
        self.needs = self.method.needs
        self.steps_per_epoch = len(self.data.train)
        # Read each step's numbers on the host every step, or every k steps (no device sync in between).
        self.host_every = config.host_every(self.device.type)
        self.pending = PendingValues()
        self.device_skip = DeviceSkip([self.group.network_parameters(i) for i in range(self.n)], self.optimizer)

        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.stats = EpochStats(self.n)
        self.best_val = [-1.0] * self.n
        self.best_val_any = -1.0
        self.history_seconds = 0.0
        # A list records every step (tests); train.step_log also writes it to RUN_DIR/steps.rank<r>.jsonl.
        self.step_log: list[dict[str, Any]] | None = [] if config.train.step_log else None
        self._rank_generator: torch.Generator | None = None
        self._stop_signal: int | None = None
        # Only now, with everything built and validated, is the run directory created (or moved aside
        # with --force) and locked for the life of the run (released by fit, or on exit).
        self._run_lock = prepare(self.run_dir, resume=resume, force=force) if self.is_main else None
        dist_utils.barrier()
        try:
            if resume:
                self._resume()
                if self.is_main:
                    resuming.record_resume(self.run_dir, self.global_step, self._resume_changes)
            if self.is_main:
                atomic_write_text(self.run_dir / "config.yaml", dump(config))  # a kill mid-write must not break --resume
            self.metrics = MetricsLog(self.run_dir, config.train.tensorboard, resume_epoch=self.epoch if resume else None) if self.is_main else None
        except BaseException:
            self.release_run_dir()
            raise

    def release_run_dir(self) -> None:
        """Unlock the run directory (the run is over); another run may use it from now on."""
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.close()
            self._run_lock = None

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def state_dict(self) -> dict[str, Any]:
        return {
            "format": ckpt.FORMAT,
            "version": __version__,
            "config": to_dict(self.config),
            "group": self.group.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": self.method.state_dict(),
            "perturb": self.perturber.state_dict() if self.perturber else None,
            "mutation": self.mutations.state_dict() if self.mutations else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "stats": self.stats.state_dict(),
            "best_val": self.best_val,
            "best_val_any": self.best_val_any,
            "history_seconds": self.history_seconds,
            "rng": ckpt.rng_state(),
            "world_size": self.info.world_size,
        }

    def save(self, name: str = "last.pt") -> None:
        self.read_pending()  # a checkpoint holds the epoch's statistics: every step must be counted first
        if self.is_main:
            ckpt.save_atomic(self.state_dict(), self.checkpoint_dir / name)
        dist_utils.barrier()

    def _resume(self) -> None:
        state, path = resuming.load_for_resume(self.checkpoint_dir / "last.pt", self.device, self.is_main)
        if state is None:
            # Stopped (e.g. killed) before its first checkpoint: nothing to restore, start from step 0.
            if self.is_main:
                log.warning("%s holds no checkpoint yet; starting the run from the beginning", self.run_dir)
            return
        resuming.check_compatible(state, path, to_dict(self.config), self.config.data.batch_size, self.info.world_size)
        try:
            self.group.load_state_dict(state["group"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit the configured models: {str(error).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if state["config"].get("optim") != to_dict(self.config)["optim"]:  # e.g. optim.lr=0.01 on resume
            resuming.apply_lr(self.optimizer, self.scheduler, self.config.optim.lr)
        self.scaler.load_state_dict(state["scaler"])
        self.method.load_state_dict(state["method"])
        if self.perturber is not None and state["perturb"] is not None:
            self.perturber.load_state_dict(state["perturb"])
        if self.mutations is not None and state.get("mutation") is not None:
            self.mutations.load_state_dict(state["mutation"])
        self.epoch, self.batch_in_epoch, self.global_step = state["epoch"], state["batch_in_epoch"], state["global_step"]
        self.stats.load_state_dict(state["stats"])
        self.best_val, self.best_val_any = state["best_val"], state["best_val_any"]
        self.history_seconds = state["history_seconds"]
        ckpt.set_rng_state(state["rng"])
        if self.is_main:
            log.info("resumed from %s at epoch %d, batch %d", path, self.epoch, self.batch_in_epoch)

    # ------------------------------------------------------------------ one step
    def train_step(self, x: Tensor, y: Tensor, index: Tensor | None = None, views: list[Tensor] | None = None) -> dict[str, Any] | None:
        """One iteration on the batch (x, y); ``views``: the other networks' own augmentations of it (Needs.own_views).

        Returns the step's record, or None while its numbers wait on the device (``train.host_every`` > 1).
        """
        context = (self.global_step, *self._decisions())
        decision, mutated = context[1], context[2]
        inputs, targets = self._perturbed_inputs(x, y, decision, views)
        bn_stats = GroupBatchNormSnapshot(self.group.networks)  # a non-finite batch must not reach running statistics
        out = self._forward(inputs, decision)
        step = self._step_input(out, targets, x, y, decision, index)
        losses = self.method.losses(step)
        self._backward(losses)
        packed = self._pack(losses, out.logits, y)
        if self.host_every == 1:  # read now: the host applies train.nonfinite before the optimizer step
            values = packed.values(packed.tensor.tolist())
            if values.nonfinite:
                bn_stats.restore_where([i in values.nonfinite for i in range(self.n)])
                handle_nonfinite(self, values.nonfinite, values.teacher)
            self._optimizer_step()
            if self.mutations is not None:
                self.mutations.after_step(values.teacher, self.group.networks)
            self.method.after_step(self.group.networks, losses, step)
            return self._account(values, context)
        finite = packed.finite  # on the device: skip diverged networks without waiting for the host
        bn_stats.restore_where(~finite)
        saved = self.device_skip.before_step(finite)
        self._optimizer_step()
        self.device_skip.after_step(finite, saved)
        self.method.after_step(self.group.networks, losses, step)
        self.pending.push(packed, context)
        return self.read_pending() if len(self.pending) >= self.host_every else None

    def _decisions(self) -> tuple[Perturbation | None, int | None]:
        """This step's input perturbation and weight mutation (host-side seeded generators: no device sync)."""
        decision = self.perturber.decide(self.global_step) if self.perturber is not None else None
        mutated = self.mutations.before_step(self.global_step, self.group.networks) if self.mutations is not None else None
        return decision, mutated

    def read_pending(self) -> dict[str, Any] | None:
        """Read the steps whose numbers wait on the device (one transfer) and account for them in order."""
        record = None
        for values, context in self.pending.drain():
            if values.nonfinite:
                if self.config.train.nonfinite == "stop":
                    handle_nonfinite(self, values.nonfinite, values.teacher, step=context[0])  # raises
                for i in values.nonfinite:  # the device already left them untouched (DeviceSkip)
                    self.stats.skipped[i] += 1
            record = self._account(values, context)
        return record

    def _account(self, values: StepValues, context: tuple) -> dict[str, Any]:
        """Add a step to the epoch's statistics and the step log."""
        step_number, decision, mutated = context
        self.stats.add(values, decision)
        record = {"step": step_number, "teacher": values.teacher, "losses": values.losses, "mutated": mutated,
                  "perturbation": None if decision is None else (decision.network, decision.op, decision.lam)}
        if self.step_log is not None:
            self.step_log.append(record)
        return record

    def _perturbed_inputs(self, x: Tensor, y: Tensor, decision: Perturbation | None, views: list[Tensor] | None) -> tuple[Any, list]:
        """The group's inputs and per-network targets: one network may see a perturbed view (mixed target)."""
        own = [x, *views] if views else None  # network i's own augmentation of the batch
        if decision is None:
            return own if own else x, [y] * self.n
        base = own[decision.network] if own else x
        x_p, t_p = self.perturber.apply(decision, base, y, self._sample_generator())
        inputs = [x_p if i == decision.network else (own[i] if own else x) for i in range(self.n)]
        return inputs, [t_p if i == decision.network else y for i in range(self.n)]

    def _forward(self, inputs: Any, decision: Perturbation | None):
        # perturb.bn_stats=freeze: the perturbed batch must not move that network's BatchNorm running statistics
        frozen = self.group.networks[decision.network] if decision is not None and self.config.perturb.bn_stats == "freeze" else None
        with autocast_context(self.device, self.precision), frozen_bn_stats(frozen):
            return self.model(inputs)

    def _step_input(self, out, targets: list, x: Tensor, y: Tensor, decision: Perturbation | None, index: Tensor | None) -> StepInput:
        return StepInput(
            logits=out.logits, targets=targets, features=out.features, extras=out.extras, adapt=self.group.adapt, x=x, y=y,
            perturbed=None if decision is None else decision.network,
            clean_ce=lambda i: self._clean_ce(x, y, i),
            reduce_mean=dist_utils.all_reduce_mean if self.info.enabled else None,
            autocast=lambda: autocast_context(self.device, self.precision),
            index=index, step=self.global_step, epoch=self.epoch,
            progress=self.global_step / (self.steps_per_epoch * self.config.optim.epochs),
        )

    def _clean_ce(self, x: Tensor, y: Tensor, network: int) -> Tensor:
        """A network's CE on the clean batch (train mode, BN running statistics untouched)."""
        net = self.group.networks[network]
        with torch.no_grad(), autocast_context(self.device, self.precision), frozen_bn_stats(net):
            return cross_entropy(net(x), y).float()

    def _backward(self, losses: GroupLosses) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses.total).backward()

    def _pack(self, losses: GroupLosses, logits: list[Tensor], y: Tensor) -> Packed:
        if self.info.enabled:
            return pack(losses, logits, y, dist_utils.all_reduce_sum, self.info.world_size)
        return pack(losses, logits, y)

    def _optimizer_step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        clip = self.config.optim.grad_clip
        if clip:
            for i in range(self.n):
                torch.nn.utils.clip_grad_norm_(self.group.network_parameters(i), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()

    def _sample_generator(self) -> torch.Generator | None:
        """Generator for the perturbation op's per-sample randomness.

        One process: None (the scheduler's own seeded stream). Under torchrun every rank perturbs its
        own slice of the global batch, so each rank reseeds a generator from (scheduler seed, rank,
        step): ranks draw different noise, and a resumed run draws the same, with no extra state.
        The decision itself (network, op, lam) comes from the scheduler and is the same on all ranks.
        """
        if not self.info.enabled:
            return None
        if self._rank_generator is None:
            self._rank_generator = torch.Generator(device=self.device)
        self._rank_generator.manual_seed(keyed_seed(keyed_seed(self.perturber.seed, self.info.rank + 1), self.global_step))
        return self._rank_generator

    # ------------------------------------------------------------------ epochs
    def _install_signal_handlers(self):
        def handler(signum, frame):
            self._stop_signal = signum
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread
                pass
        return previous

    def _batches(self):
        """The epoch's batches from where it stopped, with sample indices when the method needs them."""
        loader = self.data.train
        if self.needs.sample_index or self.needs.own_views:
            for batch in loader.iterate_batches(self.epoch, self.batch_in_epoch, views=self.n if self.needs.own_views else 1):
                yield batch.x, batch.y, batch.index, batch.views
        else:
            for x, y in loader.iterate(self.epoch, self.batch_in_epoch):
                yield x, y, None, None

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        previous_handlers = self._install_signal_handlers()
        progress = None
        try:
            while self.epoch < cfg.optim.epochs:
                self.group.train()
                start = time.perf_counter()
                if self.is_main and cfg.train.progress:
                    from tqdm.auto import tqdm

                    progress = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, leave=False, dynamic_ncols=True,
                                    desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}", mininterval=0.5)
                t_step = time.perf_counter()
                for x, y, index, views in self._batches():
                    record = self.train_step(x, y, index, views)
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    now = time.perf_counter()
                    self.stats.seconds += now - t_step
                    if progress is not None:
                        if record is not None:
                            teacher = record["teacher"]
                            progress.set_postfix(loss=f"{sum(record['losses']) / self.n:.3f}", acc=f"{self.stats.train_accuracy():.1f}",
                                                 teacher=teacher if teacher >= 0 else "-", refresh=False)
                        progress.update(1)
                    if self._after_step_io():
                        return {"stopped_at_step": self.global_step}
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
        cfg = self.config
        every = cfg.train.checkpoint_every_steps
        # (not at an epoch's last step: _end_epoch saves there, and saving twice would make last.prev.pt = last.pt)
        saved = bool(every) and self.global_step % every == 0 and self.batch_in_epoch < self.steps_per_epoch
        if saved:
            self.save()
        if cfg.train.stop_after_steps is not None and self.global_step >= cfg.train.stop_after_steps:
            if not saved:
                self.save()
            return True
        stop = self._stop_signal
        if self.info.enabled:
            flag = torch.tensor([float(stop or 0)], device=self.device)
            stop = int(dist_utils.all_reduce_max(flag).item()) or None
        if stop:
            if not saved:
                self.save()
            raise Interrupted(f"stopped by signal {stop} at step {self.global_step}; resume with --resume {self.run_dir}")
        return False

    def _write_step_log(self) -> None:
        """train.step_log (testing/debugging aid): append this rank's step records to RUN_DIR/steps.rank<r>.jsonl."""
        if not self.config.train.step_log or not self.step_log:
            return
        with open(self.run_dir / f"steps.rank{self.info.rank}.jsonl", "a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.step_log)
        self.step_log.clear()

    def _evaluate_into(self, record: dict[str, Any]) -> None:
        precision = self.precision
        for split, loader in (("val", self.data.val), ("test", self.data.test)):
            if loader is None:
                continue
            for key, value in evaluate(self.group, loader, self.device, precision).items():
                record[f"{key.split('/')[0]}/{split}_{key.split('/')[1]}"] = value
            for name, network in self.method.eval_networks().items():  # e.g. temporal-mean copies
                for key, value in evaluate_network(network, loader, self.device, precision).items():
                    record[f"{name}/{split}_{key}"] = value

    def _end_epoch(self, elapsed: float) -> None:
        cfg = self.config
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"]}
        record.update(self.stats.record())
        if self.mutations is not None:
            record.update(self.mutations.pop_counts())
        record["epoch_seconds"] = elapsed
        last_epoch = self.epoch + 1 == cfg.optim.epochs
        improved = False
        if (self.epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            self._evaluate_into(record)
            split = "val" if self.data.val is not None else "test"
            for i in range(self.n):
                self.best_val[i] = max(self.best_val[i], record[f"net{i}/{split}_top1"])
            best_now = max(record[f"net{i}/{split}_top1"] for i in range(self.n))
            if best_now > self.best_val_any:
                self.best_val_any, improved = best_now, True
        self.history_seconds += elapsed
        record["wall_seconds"] = self.history_seconds
        self.epoch += 1
        self.batch_in_epoch = 0
        self.stats = EpochStats(self.n)
        if self.is_main:
            self.metrics.write(record)
            log.info(self._epoch_line(record))
        if (self.epoch % cfg.train.checkpoint_every == 0) or last_epoch:
            self.save()
        if improved:
            self.save("best.pt")

    def _epoch_line(self, record: dict[str, Any]) -> str:
        split = "val" if "net0/val_top1" in record else "test"
        accs = " ".join(f"{record[f'net{i}/{split}_top1']:.2f}" for i in range(self.n) if f"net{i}/{split}_top1" in record)
        shares = " ".join(f"{record[f'net{i}/teacher_share']:.2f}" for i in range(self.n))
        return (f"epoch {record['epoch'] + 1}: {split} top1 [{accs}] teacher share [{shares}] "
                f"{record['images_per_s']:.0f} img/s")

    def finish(self) -> dict[str, Any]:
        summary = summarize(read_metrics(self.run_dir), self.n) if self.is_main else {}
        if self.is_main:
            summary.update({"run_dir": str(self.run_dir), "config": to_dict(self.config), "version": __version__,
                            "world_size": self.info.world_size})
            write_json(self.run_dir / "summary.json", summary)
            self.metrics.close()
        return summary


def train(config: Config, run_dir: str | Path | None = None, resume: bool = False, force: bool = False) -> dict[str, Any]:
    """Train a group as configured and return the summary (the Python API behind ``kdarena train``)."""
    trainer = Trainer(config, run_dir=run_dir, resume=resume, force=force)
    finished = False
    try:
        summary = trainer.fit()
        finished = True
        return summary
    finally:
        # Drop the DDP wrapper (and its reducer threads) before the process group goes away; wait for
        # the other ranks only after a clean finish (after an error they may never arrive).
        trainer.model = trainer.group
        gc.collect()
        dist_utils.shutdown(wait_for_peers=finished)
