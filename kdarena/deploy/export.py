"""``kdarena export RUN_DIR --out FILE``: one network (or the ensemble) as a file other tools load, with its card.

Formats:

* ``safetensors``: the tensors only (no code, no optimizer, no RNG); the card names the
  architecture, so :func:`kdarena.load_model` rebuilds it from the registry;
* ``torchscript``: ``torch.jit.trace`` of the eval-mode module (``torch.jit.load`` runs it without
  kdarena);
* ``onnx``: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, which needs
  ``onnxscript``; the legacy TorchScript exporter is deprecated), opset of torch's default, one
  dynamic batch dimension, input ``input``, output ``output``, weights inside the file.

Every exported file is read back once (ONNX: with onnxruntime, when installed) and run on a seeded
random batch: its outputs must match the module's within 1e-4, or the export is refused. The file and
its two cards are written by :mod:`kdarena.safe_files` (temporary files in the target folder, renamed
into place once all three are written): an error or a full disk leaves nothing half-written, an
older export untouched, and a device node or FIFO named by ``--out`` in place. A file of the run
folder itself is never replaced.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from ..safe_files import SafeFileError, atomic_paths, write_failed
from .card import build_card, card_paths, exported_accuracy, markdown, sha256_of
from .errors import ExportError
from .source import open_run

FORMATS = ("safetensors", "torchscript", "onnx")
SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt": "torchscript", ".pts": "torchscript", ".ts": "torchscript"}
TOLERANCE = 1e-4


def _missing(package: str) -> ExportError:
    return ExportError(f"--format needs {package}: pip install 'kdarena[export]'")


def _safetensors_bytes(module: nn.Module, example: Tensor) -> bytes:
    try:
        from safetensors.torch import save
    except ImportError:
        raise _missing("safetensors") from None
    return save({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, metadata={"format": "pt"})


@contextlib.contextmanager
def _torchscript():
    """torch 2.13 marks TorchScript deprecated; it is still what torch.jit.load users deploy with."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+. is deprecated")
        yield


def _torchscript_bytes(module: nn.Module, example: Tensor) -> bytes:
    # Into memory, never a file: torch.jit.save's own writer aborts the process on a full disk (exit 134).
    buffer = io.BytesIO()
    with torch.no_grad(), _torchscript():
        torch.jit.save(torch.jit.trace(module, example), buffer)
    return buffer.getvalue()


@contextlib.contextmanager
def _quiet_onnx():
    """The exporter logs its steps and warns about torchvision ops that CIFAR models never use."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _onnx_bytes(module: nn.Module, example: Tensor) -> bytes:
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise _missing("onnx and onnxscript") from None
    with _quiet_onnx():
        program = torch.onnx.export(module, (example,), dynamo=True, input_names=["input"], output_names=["output"],
                                    dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    return program.model_proto.SerializeToString()  # weights inside the file (no external data)


# Each exporter gives the file's bytes: exporting and writing fail apart (a full disk is not "try another --format").
EXPORTERS: dict[str, Callable[[nn.Module, Tensor], bytes]] = {
    "safetensors": _safetensors_bytes, "torchscript": _torchscript_bytes, "onnx": _onnx_bytes}


def run_exported(fmt: str, path: str, x: Tensor, module: nn.Module | None = None) -> Tensor | None:
    """The exported file's output on ``x``, read back with the format's own loader (None: no runtime installed)."""
    if fmt == "torchscript":
        with _torchscript():
            return torch.jit.load(path, map_location="cpu")(x)
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    from safetensors.torch import load_file

    module.load_state_dict(load_file(path))  # the same tensors back into the module
    return module(x)


def _format_of(out: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ExportError(f"--format {fmt!r}: give one of {', '.join(FORMATS)}")
        return fmt
    found = SUFFIXES.get(out.suffix.lower())
    if found is None:
        raise ExportError(f"--out {out}: cannot tell the format from {out.suffix or 'no suffix'!r}; give --format "
                          f"{'|'.join(FORMATS)} or name the file .safetensors, .pt (TorchScript) or .onnx")
    return found


def _refuse_run_files(run_dir: Path, out: Path) -> None:
    """``out`` and its cards must not replace a file of the run (``--out RUN/checkpoints/last.pt`` once overwrote
    the resume checkpoint); an earlier export into the run folder (its card beside it) may be replaced."""
    root = Path(os.path.realpath(run_dir))
    earlier_export = card_paths(out)[0].is_file()
    for path in (out, *card_paths(out)):
        target = Path(os.path.realpath(path))
        if target.is_relative_to(root) and target.exists() and (not earlier_export or "checkpoints" in target.relative_to(root).parts):
            raise ExportError(f"--out {out} would replace {target}, a file of the run {run_dir}; give a new file name "
                              "(outside the run folder, or one that is not a run file)")


def _refuse_nonfinite(selected) -> None:
    """Weights of NaN or inf would be exported under a card quoting the run's accuracy."""
    bad = [name for name, t in selected.module.state_dict().items() if t.is_floating_point() and not bool(t.isfinite().all())]
    if bad:
        raise ExportError(f"{selected.network} in {selected.checkpoint} has non-finite weights ({len(bad)} tensor(s), first "
                          f"{bad[0]}); it cannot be exported; choose another --network or --checkpoint")


def export_run(run_dir: str | Path, out: str | Path, network: str = "best", checkpoint: str = "best",
               fmt: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Export ``run_dir``'s network to ``out`` with its model card; returns the card."""
    out = Path(out)
    try:
        if out.is_dir():
            raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.safetensors'}")
        fmt = _format_of(out, fmt)
        selected = open_run(run_dir, checkpoint, network, overrides, want_data=True, command="kdarena export RUN --out FILE")
        if out.resolve() == selected.checkpoint.resolve():
            raise ExportError(f"--out {out} is the checkpoint being exported; give another file name")
        _refuse_run_files(Path(run_dir), out)
        _refuse_nonfinite(selected)
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a name too long, a read-only or missing folder: one line
        if isinstance(error, SafeFileError):
            raise
        raise write_failed(error.filename or out, error) from None
    example = torch.randn(2, *selected.inputs.input.shape, generator=torch.Generator().manual_seed(0))
    model_card, summary_card = card_paths(out)
    with atomic_paths(out, model_card, summary_card) as (model_temp, card_temp, summary_temp):
        try:
            data = EXPORTERS[fmt](selected.module, example)
        except ExportError:
            raise
        except Exception as error:  # the exporter cannot take this model (an op, a control flow, a size)
            raise ExportError(f"{selected.network} ({' + '.join(selected.architecture)}) cannot be exported as {fmt}: "
                              f"{_reason(error)}; try another --format") from None
        _write(model_temp, data, out)
        _check_outputs(fmt, model_temp, selected.module, example)
        selected.accuracy = exported_accuracy(selected, Path(run_dir))
        card = build_card(selected, fmt, out, hashlib.sha256(data).hexdigest(), sha256_of(selected.checkpoint), Path(run_dir))
        _write(card_temp, (json.dumps(card, indent=2) + "\n").encode(), model_card)
        _write(summary_temp, markdown(card).encode(), summary_card)
    return card


def _write(temp: str, data: bytes, final: Path) -> None:
    """``data`` into ``temp``; an OS error names ``final``, the file the user asked for."""
    try:
        with open(temp, "wb") as handle:
            handle.write(data)
    except OSError as error:
        raise write_failed(final, error) from None


def _reason(error: BaseException) -> str:
    """The innermost cause's first line, without terminal colours (the exporters wrap the real reason)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def _check_outputs(fmt: str, path: str, module: nn.Module, example: Tensor) -> None:
    with torch.no_grad():
        expected = module(example)
        got = run_exported(fmt, path, example, copy.deepcopy(module))
    if got is None:
        return
    diff = (got.float() - expected.float()).abs().max().item()
    if not diff <= TOLERANCE:
        raise ExportError(f"the {fmt} export computes other outputs than the network (max difference {diff:.2e} > "
                          f"{TOLERANCE}); try another --format")
