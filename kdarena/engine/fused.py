"""A fused forward for groups of identical networks: one vmapped call instead of n.

:class:`FusedGroup` runs the n networks of a :class:`~kdarena.group.Group` as ONE batched
computation with ``torch.func.functional_call`` + ``torch.func.vmap`` over their stacked
parameters and buffers. Under vmap a convolution with per-network weights becomes one grouped
convolution and a BatchNorm one wider BatchNorm, so a step launches about n times fewer kernels
(the point on a GPU, where CIFAR-sized networks are launch-bound). It returns the same
:class:`~kdarena.group.GroupOutput` as ``Group.forward``, so every method's losses, the one
backward pass and the host transfer of the trainer are unchanged.

Shared storage instead of copies
--------------------------------
The constructor stacks each parameter and buffer of the n networks into one ``(n, ...)`` tensor
and then points every original parameter / buffer (``.data``) at its slice of that tensor. So:

* the stacked tensors are the leaves autograd sees; a post-accumulate-grad hook on each hands the
  per-network slices of its gradient to the ORIGINAL parameters' ``.grad`` (views, no copy), and
  the trainer's optimizer, per-network gradient clipping, non-finite skipping and re-birth work on
  the original parameters exactly as in the loop;
* an optimizer step (in place, on the original parameters) updates the stacked tensors too, and
  ``state_dict`` / ``load_state_dict`` / evaluation of ``group.networks[i]`` see the same values:
  checkpoints keep their format and load into fused or unfused runs alike.

Do not move or cast the group (``.to``, ``.half()``, ``to(memory_format=...)``) after building a
FusedGroup: that replaces the parameters' storage and silently unties them from the stacked
tensors. Build it last (the trainer does).

BatchNorm in training mode
--------------------------
The running statistics are stacked like the parameters and passed to vmap as batched inputs, so
BatchNorm's in-place update of ``running_mean`` / ``running_var`` / ``num_batches_tracked``
writes each network's own slice: batch statistics, normalisation, running statistics and
gradients are those of n separate BatchNorms (checked by ``tests/test_fused.py``). We therefore
do NOT use ``torch.func.replace_all_batch_norm_modules_`` (which stops tracking running stats
and would change evaluation). vmap only refuses an in-place update of an *unbatched* buffer by a
batched value, which cannot happen here since every buffer is batched.

Limits: identical architectures only (same module types, parameter/buffer names, shapes and
dtypes), single process (no DDP: its reducer hooks the original parameters, which no longer
take part in autograd), no feature adapters (identical networks never need them). Dropout masks
differ per network (``randomness="different"``) but are not bitwise those of the loop.
"""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from ..group import Group, GroupOutput


class FusedGroupError(ValueError):
    """The group cannot be fused (different architectures, adapters...); the message says why."""


def _signature(net: nn.Module) -> tuple:
    params = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in net.named_parameters())
    buffers = tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in net.named_buffers())
    types = tuple((k, type(m)) for k, m in net.named_modules())
    return params, buffers, types


def check_fusable(group: Group) -> None:
    """Raise :class:`FusedGroupError` unless every network of ``group`` has the same architecture."""
    nets = list(group.networks)
    if len(nets) < 2:
        raise FusedGroupError("fusing needs at least 2 networks")
    ref = _signature(nets[0])
    for i, net in enumerate(nets[1:], start=1):
        sig = _signature(net)
        if sig != ref:
            what = "parameters" if sig[0] != ref[0] else "buffers" if sig[1] != ref[1] else "module types"
            raise FusedGroupError(
                f"network {i} ({type(net).__name__}) differs from network 0 ({type(nets[0]).__name__}) in its {what}; "
                "train.fused needs identical architectures (same model name for every entry of models)"
            )
    if len(group.adapters) > 0:
        raise FusedGroupError("train.fused does not support feature adapters (networks with different feature shapes)")
    if any(not p.requires_grad for p in nets[0].parameters()):
        raise FusedGroupError("train.fused needs every parameter to require grad (no frozen layers)")


class FusedGroup:
    """Run the identical networks of ``group`` as one vmapped computation (see the module doc).

    ``fused(x)`` or ``fused([x_0, ..., x_{n-1}])`` returns a :class:`GroupOutput` like
    ``group(x)``; gradients of a backward pass land in the original parameters' ``.grad``.
    ``compile=True`` wraps the vmapped forward in ``torch.compile``.
    """

    def __init__(self, group: Group, compile: bool = False):
        check_fusable(group)
        self.group = group
        nets = list(group.networks)
        self.n = len(nets)
        # A parameter-less skeleton: functional_call swaps the stacked slices in.
        base = copy.deepcopy(nets[0]).to("meta")
        for module in base.modules():  # drop the Group's feature hooks (they would capture vmapped tensors)
            module._forward_hooks.clear()
            module._forward_pre_hooks.clear()
        self._base = base
        self._feature_store: list[Tensor] = []
        self.collect_features = group.collect_features
        if self.collect_features:
            layer = group.feature_layers[0]
            base.get_submodule(layer).register_forward_hook(lambda m, i, out: self._feature_store.append(out))

        self.params: dict[str, Tensor] = {}
        self.buffers: dict[str, Tensor] = {}
        self._hooks = []
        with torch.no_grad():
            for name, _ in nets[0].named_parameters():
                originals = [net.get_parameter(name) for net in nets]
                stacked = torch.stack([p.detach() for p in originals]).requires_grad_(True)
                for i, p in enumerate(originals):
                    p.data = stacked.detach()[i]
                self.params[name] = stacked
                self._hooks.append(stacked.register_post_accumulate_grad_hook(self._grad_hook(originals)))
            for name, _ in nets[0].named_buffers():
                originals = [net.get_buffer(name) for net in nets]
                stacked = torch.stack([b.detach() for b in originals])
                for i, b in enumerate(originals):
                    b.data = stacked[i]
                self.buffers[name] = stacked
        self._compile = compile
        self._runners: dict[object, Callable] = {}

    def compiled(self, mode: str = "default") -> "FusedGroup":
        """The same fused group (same stacked tensors and gradient hooks) with a ``torch.compile``'d forward."""
        twin = copy.copy(self)
        twin._compile, twin._compile_mode, twin._runners = True, mode, {}
        return twin

    # ------------------------------------------------------------------ gradients
    @staticmethod
    def _grad_hook(originals: Sequence[nn.Parameter]):
        def hand_out(stacked: Tensor) -> None:
            grad = stacked.grad
            stacked.grad = None
            for p, g in zip(originals, grad.unbind(0)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        return hand_out

    # ------------------------------------------------------------------ forward
    def _single(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor):
        logits = functional_call(self._base, (params, buffers), (x,))
        if self.collect_features:
            return logits, self._feature_store.pop()
        return logits

    def _runner(self, x_dim: int | None) -> Callable:
        runner = self._runners.get(x_dim)
        if runner is None:
            runner = vmap(self._single, in_dims=(0, 0, x_dim), randomness="different")
            if self._compile:
                runner = torch.compile(runner, mode=getattr(self, "_compile_mode", "default"))
            self._runners[x_dim] = runner
        return runner

    def __call__(self, x: Tensor | Sequence[Tensor]) -> GroupOutput:
        training = self.group.networks[0].training
        if self._base.training != training:
            self._base.train(training)
        if isinstance(x, (list, tuple)):
            if len(x) != self.n:
                raise ValueError(f"got {len(x)} inputs for {self.n} networks")
            if all(xi is x[0] for xi in x):
                inputs, dim = x[0], None  # one shared batch: the first conv runs once, n times wider
            else:
                inputs, dim = torch.stack(list(x)), 0  # torch.stack keeps channels_last per slice
        else:
            inputs, dim = x, None
        self._feature_store.clear()
        out = self._runner(dim)(self.params, self.buffers, inputs)
        if self.collect_features:
            logits, features = out
            return GroupOutput(list(logits.unbind(0)), list(features.unbind(0)))
        return GroupOutput(list(out.unbind(0)), None)

    forward = __call__

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the original parameters keep sharing the stacked storage)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
