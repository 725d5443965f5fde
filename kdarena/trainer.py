"""Training loop for a group: perturb -> group forward -> method losses -> one backward -> step.

Plain and linear on purpose (torchvision references / nanoGPT style): a :class:`Trainer`
holds the state that a checkpoint must capture; ``fit`` runs epochs; ``train_step`` is one
iteration. Only rank 0 writes files or shows progress.
"""
from __future__ import annotations

import gc
import json
import logging
import math
import signal
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__, checkpoint as ckpt, distributed as dist_utils
from .build import build_data, build_group, build_method, build_optimizer, build_perturbation, build_teacher
from .config import Config, ConfigError, dump, to_dict
from .data.tensor_loader import epoch_seed
from .evaluate import autocast_context, evaluate
from .losses import cross_entropy
from .methods import CompetitiveDistillation
from .mutation import MutationTracker
from .runlog import MetricsLog, atomic_write_text, prepare, read_metrics, write_json
from .schedule import build_scheduler

log = logging.getLogger("kdarena")


@contextmanager
def frozen_bn_stats(network: nn.Module | None):
    """Let ``network``'s BatchNorm layers normalise with batch statistics without updating their running ones.

    momentum 0 makes the running update a no-op (running = 1 * running + 0 * batch), so the forward and
    backward are exactly those of training mode.
    """
    if network is None:
        yield
        return
    layers = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None) for m in layers]
    for m in layers:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(layers, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class NonFiniteLossError(RuntimeError):
    pass


class Interrupted(Exception):
    """Raised after a SIGINT/SIGTERM once a checkpoint has been written."""


class _EpochStats:
    """Host-side sums for one epoch (restored with a mid-epoch checkpoint)."""

    def __init__(self, n: int):
        self.n = n
        self.sums: dict[str, float] = defaultdict(float)
        self.teacher = [0] * n
        self.perturbed: dict[str, int] = defaultdict(int)
        self.perturbed_won: dict[str, int] = defaultdict(int)
        self.skipped = [0] * n
        self.reborn = [0] * n
        self.switches = 0
        self.steps = 0
        self.samples = 0
        self.seconds = 0.0
        self.last_teacher = -1

    def state_dict(self) -> dict[str, Any]:
        return {k: (dict(v) if isinstance(v, defaultdict) else v) for k, v in vars(self).items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            if key in ("sums",):
                self.sums = defaultdict(float, value)
            elif key in ("perturbed", "perturbed_won"):
                setattr(self, key, defaultdict(int, value))
            else:
                setattr(self, key, value)


class Trainer:
    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: bool = False, force: bool = False):
        self.config = config
        self.info = dist_utils.from_environment()
        self.device = dist_utils.resolve_device(config.train.device, self.info)
        dist_utils.init(self.info, self.device)
        self.is_main = self.info.is_main
        self.run_dir = Path(run_dir) if run_dir is not None else Path(config.output) / config.name
        if self.is_main:
            prepare(self.run_dir, resume=resume, force=force)
        dist_utils.barrier()
        t = config.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=self.device.type == "cuda")
            torch.backends.cudnn.benchmark = False
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        if config.train.precision == "fp16" and self.device.type == "cpu":
            log.warning("fp16 autocast on CPU is slow; bf16 is the fast CPU choice")

        torch.manual_seed(config.seed)
        self.data = build_data(config, self.device, self.info.rank, self.info.world_size)
        self.group = build_group(config, self.data.num_classes, self.data.in_channels).to(self.device)
        if t.channels_last:
            self.group.to(memory_format=torch.channels_last)
        example = next(iter(self.data.train.iterate(0, 0)))[0]
        self.group.build_adapters(example)
        if t.sync_batchnorm and self.info.enabled:
            if self.device.type == "cpu":  # torch's SyncBatchNorm raises on CPU tensors (torch 2.13)
                raise ConfigError("train.sync_batchnorm=true needs GPUs: torch's SyncBatchNorm does not run on CPU; drop it for CPU (gloo) runs")
            self.group = nn.SyncBatchNorm.convert_sync_batchnorm(self.group)
        self.n = len(self.group)
        self.method = build_method(config)
        self.teacher_net = build_teacher(config, self.data.num_classes, self.data.in_channels, self.device) if config.method.name == "kd" else None
        self.perturber = build_perturbation(config)
        mutation = config.perturb.parameters
        self.mutations = (
            MutationTracker(self.n, mutation.scale, mutation.every, mutation.rollback_after, config.seed + 104729)
            if mutation.enabled and config.method.name != "kd" else None
        )
        self.optimizer = build_optimizer(config, self.group)
        self.steps_per_epoch = len(self.data.train)
        if self.steps_per_epoch == 0:
            raise ConfigError("the training loader yields no batch; lower data.batch_size")
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=t.precision == "fp16")
        self.model: nn.Module = self.group
        if self.info.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DDP(self.group, device_ids=ids)
        if t.fused and self.device.type == "cuda" and t.precision == "fp32" and t.channels_last:
            # Seen on an H200 with torch 2.11: "NYI: querying is_contiguous inside of vmap" in the fp32 conv path.
            raise ConfigError("train.fused=true with precision fp32 on CUDA needs train.channels_last=false (vmap limitation)")
        if t.fused:  # one vmapped forward for identical networks; parameters stay shared with self.group
            from .fused import FusedGroup, FusedGroupError

            if self.info.enabled:
                raise ConfigError("train.fused supports single-process training only; set train.fused=false with torchrun")
            try:
                self.model = FusedGroup(self.group, compile=t.compile)
            except FusedGroupError as error:
                raise ConfigError(f"bad value for 'train.fused': {error}") from None
        elif t.compile:
            self.group.set_runners([torch.compile(net) for net in self.group.networks])

        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.stats = _EpochStats(self.n)
        self.best_val = [-1.0] * self.n
        self.best_val_any = -1.0
        self.history_seconds = 0.0
        # A list records every step (tests); train.step_log also writes it to RUN_DIR/steps.rank<r>.jsonl.
        self.step_log: list[dict[str, Any]] | None = [] if t.step_log else None
        self._rank_generator: torch.Generator | None = None
        self._stop_signal: int | None = None
        if resume:
            self._resume()
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", dump(config))  # a kill mid-write must not break --resume
        self.metrics = MetricsLog(self.run_dir, t.tensorboard, resume_epoch=self.epoch if resume else None) if self.is_main else None

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
        if self.is_main:
            ckpt.save_atomic(self.state_dict(), self.checkpoint_dir / name)
        dist_utils.barrier()

    def _resume(self) -> None:
        path = self.checkpoint_dir / "last.pt"
        previous = ckpt.previous_path(path)
        if not path.exists() and not previous.exists():
            # Stopped (e.g. killed) before its first checkpoint: nothing to restore, start from step 0.
            if self.is_main:
                log.warning("%s holds no checkpoint yet; starting the run from the beginning", self.run_dir)
            return
        try:
            state = ckpt.load(path, map_location=self.device)
        except ckpt.CheckpointError as error:
            if not previous.is_file():
                raise
            log.warning("%s; resuming from the previous checkpoint %s instead", error, previous)
            state = ckpt.load(previous, map_location=self.device)
            if self.is_main and path.exists():
                # Keep the bad file for inspection, but out of the way: the next save must not
                # rotate it over the good previous checkpoint.
                path.replace(path.with_name(path.stem + ".corrupt" + path.suffix))
            path = previous
        mismatch = ckpt.describe_mismatch(state["config"], to_dict(self.config))
        if mismatch:
            raise ckpt.CheckpointError(f"checkpoint {path} was made for another run: {mismatch}; "
                                       f"resume without that override, or start a new run with --out")
        saved_world = int(state.get("world_size", 1))
        saved_batch = state["config"].get("data", {}).get("batch_size", self.config.data.batch_size)
        if saved_batch * saved_world != self.config.data.batch_size * self.info.world_size:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was trained with a global batch of {saved_batch} x {saved_world} process(es); "
                f"resume with the same data.batch_size x number of processes (now {self.config.data.batch_size} x {self.info.world_size})"
            )
        try:
            self.group.load_state_dict(state["group"])
        except RuntimeError as error:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit the configured models: {str(error).splitlines()[0]}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
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
    def _clean_ce(self, x: Tensor, y: Tensor, network: int) -> Tensor:
        """The perturbed network's CE on the clean batch (train mode, BN running statistics untouched)."""
        net = self.group.networks[network]
        with torch.no_grad(), autocast_context(self.device, self.config.train.precision), frozen_bn_stats(net):
            return cross_entropy(net(x), y).float()

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
        self._rank_generator.manual_seed(epoch_seed(epoch_seed(self.perturber.seed, self.info.rank + 1), self.global_step))
        return self._rank_generator

    def train_step(self, x: Tensor, y: Tensor) -> dict[str, Any]:
        cfg = self.config
        n = self.n
        decision = self.perturber.decide(self.global_step) if self.perturber is not None else None
        mutated = self.mutations.before_step(self.global_step, self.group.networks) if self.mutations is not None else None
        inputs: Any = x
        targets: Any = y
        if decision is not None:
            x_p, t_p = self.perturber.apply(decision, x, y, self._sample_generator())
            inputs = [x_p if i == decision.network else x for i in range(n)]
            targets = [t_p if i == decision.network else y for i in range(n)]
        is_cd = isinstance(self.method, CompetitiveDistillation)
        clean_ce = None
        if is_cd and decision is not None and cfg.method.selection in ("clean", "smoothed"):
            clean_ce = self._clean_ce(x, y, decision.network)
        frozen = decision is not None and cfg.perturb.bn_stats == "freeze" and not cfg.train.fused
        with autocast_context(self.device, cfg.train.precision), frozen_bn_stats(self.group.networks[decision.network] if frozen else None):
            out = self.model(inputs)
            teacher_logits = None
            if self.teacher_net is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher_net(x)
        selection_ce = None
        if is_cd and (cfg.method.selection in ("clean", "smoothed") or self.info.enabled):
            own = torch.stack([cross_entropy(z, t) for z, t in zip(out.logits, targets if isinstance(targets, list) else [targets] * n)]).detach().float()
            selection_ce = own
            if clean_ce is not None:
                selection_ce = own.clone()
                selection_ce[decision.network] = clean_ce
            if self.info.enabled:  # every rank must pick the same teacher: judge on the global batch
                selection_ce = dist_utils.all_reduce_mean(selection_ce.clone())
        losses = self.method.losses(out.logits, targets, out.features, self.group.adapt, selection_ce, teacher_logits)

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(losses.total).backward()

        # One host transfer per step: losses (finite check + logging), teacher, train hits, terms.
        term_names = sorted(losses.terms)
        hits = torch.stack([(z.argmax(1) == y).sum() for z in out.logits]).float()
        packed = torch.cat([
            torch.stack([p.detach().float() for p in losses.per_network]),
            losses.teacher_index.float().reshape(1),
            hits,
            torch.stack([losses.terms[k].float() for k in term_names]) if term_names else hits.new_zeros(0),
        ])
        batch = y.shape[0]
        if self.info.enabled:
            # One collective per step: global-batch means (losses, terms) and sums (hits, samples), so every
            # rank logs and applies train.nonfinite identically; NaN/Inf on any rank stays non-finite. The
            # teacher stays this rank's own choice (from the all-reduced selection CE), so records show any disagreement.
            reduced = dist_utils.all_reduce_sum(torch.cat([packed[:n], packed[n + 1:], packed.new_tensor([float(batch)])]))
            packed = torch.cat([reduced[:n], packed[n:n + 1], reduced[n:]])
        values = packed.tolist()
        if self.info.enabled:
            w = self.info.world_size
            batch = int(values.pop())
            values = [v / w for v in values[:n]] + values[n:2 * n + 1] + [v / w for v in values[2 * n + 1:]]
        finite = [math.isfinite(v) for v in values[:n]]
        per_network, teacher = values[:n], int(values[n])
        bad = [i for i in range(n) if not finite[i]]
        if bad:
            self._handle_nonfinite(bad, teacher)

        self.scaler.unscale_(self.optimizer)
        if cfg.optim.grad_clip:
            for i in range(n):
                torch.nn.utils.clip_grad_norm_(self.group.network_parameters(i), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.mutations is not None:
            self.mutations.after_step(teacher, self.group.networks)

        s = self.stats
        s.steps += 1
        s.samples += batch
        for i in range(n):
            if finite[i]:
                s.sums[f"loss_{i}"] += per_network[i]
            s.sums[f"hits_{i}"] += values[n + 1 + i]
        s.sums["count"] += batch
        for name, value in zip(term_names, values[2 * n + 1:]):
            if math.isfinite(value):
                s.sums[name] += value
        if teacher >= 0:
            s.teacher[teacher] += 1
            if s.last_teacher >= 0 and teacher != s.last_teacher:
                s.switches += 1
            s.last_teacher = teacher
        if decision is not None:
            s.perturbed[decision.op] += 1
            if decision.network == teacher:
                s.perturbed_won[decision.op] += 1
        record = {"step": self.global_step, "teacher": teacher, "losses": per_network, "mutated": mutated,
                  "perturbation": None if decision is None else (decision.network, decision.op, decision.lam)}
        if self.step_log is not None:
            self.step_log.append(record)
        return record

    def _handle_nonfinite(self, bad: list[int], teacher: int) -> None:
        policy = self.config.train.nonfinite
        if policy == "stop":
            raise NonFiniteLossError(
                f"network(s) {bad} produced a non-finite loss at step {self.global_step} (epoch {self.epoch}); "
                f"the last checkpoint is in {self.checkpoint_dir}; lower optim.lr, set optim.grad_clip, "
                f"or choose train.nonfinite=skip or rebirth"
            )
        for i in bad:
            # Its gradients are NaN/Inf: drop them, so the optimizer leaves the network untouched this step.
            for p in self.group.network_parameters(i):
                p.grad = None
            self.stats.skipped[i] += 1
            if policy == "rebirth":
                self._rebirth(i, teacher)

    @torch.no_grad()
    def _rebirth(self, index: int, teacher: int) -> None:
        """Replace a diverged network by a copy of the current teacher (same architecture) or a fresh one."""
        target = self.group.networks[index]
        same_arch = 0 <= teacher < self.n and teacher != index and self.config.models[teacher] == self.config.models[index]
        if same_arch:
            target.load_state_dict(self.group.networks[teacher].state_dict())
        else:
            from . import models

            fresh = models.create(self.config.models[index], self.data.num_classes, self.data.in_channels).to(self.device)
            target.load_state_dict(fresh.state_dict())
        for p in target.parameters():
            self.optimizer.state.pop(p, None)
        self.stats.reborn[index] += 1
        log.warning("network %d diverged and was re-born from %s", index, f"network {teacher}" if same_arch else "a fresh initialisation")

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

    def _epoch_record(self, elapsed: float) -> dict[str, Any]:
        s, n = self.stats, self.n
        count = max(s.sums["count"], 1.0)
        record: dict[str, Any] = {"epoch": self.epoch, "step": self.global_step, "lr": self.optimizer.param_groups[0]["lr"]}
        steps = max(s.steps, 1)
        for i in range(n):
            record[f"net{i}/train_loss"] = s.sums[f"loss_{i}"] / max(s.steps - s.skipped[i], 1)
            record[f"net{i}/train_top1"] = 100.0 * s.sums[f"hits_{i}"] / count
            for term in ("ce", "kd", "feat"):
                if f"{term}_{i}" in s.sums:
                    record[f"net{i}/{term}"] = s.sums[f"{term}_{i}"] / steps
            record[f"net{i}/teacher_share"] = s.teacher[i] / steps
            record[f"net{i}/skipped_steps"] = s.skipped[i]
            record[f"net{i}/reborn"] = s.reborn[i]
        record["teacher_switches"] = s.switches
        record["perturbed_steps"] = sum(s.perturbed.values())
        record["perturbed_won"] = sum(s.perturbed_won.values())
        for op, count_op in sorted(s.perturbed.items()):
            record[f"perturb/{op}/count"] = count_op
            record[f"perturb/{op}/won"] = s.perturbed_won.get(op, 0)
        if self.mutations is not None:
            record.update(self.mutations.pop_counts())
        record["train_seconds"] = s.seconds
        record["images_per_s"] = s.samples / s.seconds if s.seconds > 0 else 0.0
        record["epoch_seconds"] = elapsed
        return record

    def _evaluate_into(self, record: dict[str, Any]) -> None:
        precision = self.config.train.precision
        for split, loader in (("val", self.data.val), ("test", self.data.test)):
            if loader is None:
                continue
            for key, value in evaluate(self.group, loader, self.device, precision).items():
                record[f"{key.split('/')[0]}/{split}_{key.split('/')[1]}"] = value

    def fit(self) -> dict[str, Any]:
        cfg = self.config
        previous_handlers = self._install_signal_handlers()
        progress = None
        try:
            while self.epoch < cfg.optim.epochs:
                self.group.train()
                start = time.perf_counter()
                total = self.steps_per_epoch
                if self.is_main and cfg.train.progress:
                    from tqdm.auto import tqdm

                    progress = tqdm(total=total, initial=self.batch_in_epoch, desc=f"epoch {self.epoch + 1}/{cfg.optim.epochs}",
                                    leave=False, dynamic_ncols=True, mininterval=0.5)
                t_step = time.perf_counter()
                for x, y in self.data.train.iterate(self.epoch, self.batch_in_epoch):
                    record = self.train_step(x, y)
                    self.global_step += 1
                    self.batch_in_epoch += 1
                    now = time.perf_counter()
                    self.stats.seconds += now - t_step
                    if progress is not None:
                        teacher = record["teacher"]
                        seen = max(self.stats.sums["count"], 1.0)
                        accuracy = 100.0 * sum(self.stats.sums[f"hits_{i}"] for i in range(self.n)) / (self.n * seen)
                        progress.set_postfix(loss=f"{sum(record['losses']) / self.n:.3f}", acc=f"{accuracy:.1f}",
                                             teacher=teacher if teacher >= 0 else "-", refresh=False)
                        progress.update(1)
                    saved = self._checkpoint_now()  # (saving twice at one step would make last.prev.pt = last.pt)
                    if saved:
                        self.save()
                    if cfg.train.stop_after_steps is not None and self.global_step >= cfg.train.stop_after_steps:
                        if not saved:
                            self.save()
                        return {"stopped_at_step": self.global_step}
                    stop = self._stop_signal
                    if self.info.enabled:
                        flag = torch.tensor([float(stop or 0)], device=self.device)
                        stop = int(dist_utils.all_reduce_max(flag).item()) or None
                    if stop:
                        if not saved:
                            self.save()
                        raise Interrupted(f"stopped by signal {stop} at step {self.global_step}; resume with --resume {self.run_dir}")
                    t_step = time.perf_counter()
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

    def _write_step_log(self) -> None:
        """train.step_log (testing/debugging aid): append this rank's step records to RUN_DIR/steps.rank<r>.jsonl."""
        if not self.config.train.step_log or not self.step_log:
            return
        with open(self.run_dir / f"steps.rank{self.info.rank}.jsonl", "a") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.step_log)
        self.step_log.clear()

    def _checkpoint_now(self) -> bool:
        every = self.config.train.checkpoint_every_steps
        return bool(every) and self.global_step % every == 0 and self.batch_in_epoch < self.steps_per_epoch

    def _end_epoch(self, elapsed: float) -> None:
        cfg = self.config
        record = self._epoch_record(elapsed)
        last_epoch = self.epoch + 1 == cfg.optim.epochs
        improved = False
        if (self.epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            self._evaluate_into(record)
            split = "val" if self.data.val is not None else "test"
            for i in range(self.n):
                acc = record[f"net{i}/{split}_top1"]
                if acc > self.best_val[i]:
                    self.best_val[i] = acc
            best_now = max(record[f"net{i}/{split}_top1"] for i in range(self.n))
            if best_now > self.best_val_any:
                self.best_val_any, improved = best_now, True
        self.history_seconds += elapsed
        record["wall_seconds"] = self.history_seconds
        self.epoch += 1
        self.batch_in_epoch = 0
        self.stats = _EpochStats(self.n)
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


def summarize(records: list[dict[str, Any]], n: int) -> dict[str, Any]:
    """Last-epoch and best-validation-epoch test accuracy for every network and the ensemble.

    ``test_at_best_val`` is the test accuracy at the epoch where that network's validation
    accuracy peaked; ``best_test`` (picked on the test set itself) is kept but labelled so.
    """
    evaluated = [r for r in records if "net0/test_top1" in r]
    if not evaluated:
        return {"epochs": len(records), "networks": []}
    has_val = "net0/val_top1" in evaluated[-1]
    out: dict[str, Any] = {"epochs": len(records), "selection_split": "val" if has_val else "test", "networks": []}
    for key in [f"net{i}" for i in range(n)] + ["ensemble"]:
        last = evaluated[-1]
        entry = {"name": key, "last_test_top1": last[f"{key}/test_top1"], "last_test_top5": last[f"{key}/test_top5"]}
        if has_val:
            best = max(evaluated, key=lambda r: r[f"{key}/val_top1"])
            entry.update({"best_val_top1": best[f"{key}/val_top1"], "best_val_epoch": best["epoch"],
                          "test_at_best_val_top1": best[f"{key}/test_top1"], "last_val_top1": last[f"{key}/val_top1"]})
        best_test = max(evaluated, key=lambda r: r[f"{key}/test_top1"])
        entry.update({"best_test_top1_selected_on_test": best_test[f"{key}/test_top1"], "best_test_epoch": best_test["epoch"]})
        if key != "ensemble":
            entry["teacher_share"] = sum(r.get(f"{key}/teacher_share", 0.0) for r in records) / len(records)
        if key == "ensemble":
            out["ensemble"] = entry
        else:
            out["networks"].append(entry)
    out["wall_seconds"] = records[-1].get("wall_seconds", 0.0)
    speeds = [r["images_per_s"] for r in records if r.get("images_per_s")]
    out["images_per_s"] = sorted(speeds)[len(speeds) // 2] if speeds else 0.0
    out["perturbed_steps"] = sum(r.get("perturbed_steps", 0) for r in records)
    out["perturbed_won"] = sum(r.get("perturbed_won", 0) for r in records)
    return out


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
