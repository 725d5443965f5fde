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
random batch: its outputs must match the module's within 1e-4, or the export is refused. Writes go to temporary files in the target folder,
then the file and its two cards are renamed into place: an error or a full disk leaves nothing
half-written (and an older export untouched).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .card import build_card, card_paths, markdown, preprocessing, sha256_of
from .errors import ExportError
from .source import open_run

FORMATS = ("safetensors", "torchscript", "onnx")
SUFFIXES = {".safetensors": "safetensors", ".onnx": "onnx", ".pt": "torchscript", ".pts": "torchscript", ".ts": "torchscript"}
TOLERANCE = 1e-4


def _missing(package: str) -> ExportError:
    return ExportError(f"--format needs {package}: pip install 'kdarena[export]'")


def _write_safetensors(module: nn.Module, example: Tensor, path: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise _missing("safetensors") from None
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, path, metadata={"format": "pt"})


@contextlib.contextmanager
def _torchscript():
    """torch 2.13 marks TorchScript deprecated; it is still what torch.jit.load users deploy with."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+. is deprecated")
        yield


def _write_torchscript(module: nn.Module, example: Tensor, path: str) -> None:
    with torch.no_grad(), _torchscript():
        torch.jit.save(torch.jit.trace(module, example), path)


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


def _write_onnx(module: nn.Module, example: Tensor, path: str) -> None:
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError:
        raise _missing("onnx and onnxscript") from None
    with _quiet_onnx():
        torch.onnx.export(module, (example,), path, dynamo=True, input_names=["input"], output_names=["output"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)


WRITERS: dict[str, Callable[[nn.Module, Tensor, str], None]] = {
    "safetensors": _write_safetensors, "torchscript": _write_torchscript, "onnx": _write_onnx}


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


def _temporary(folder: Path, name: str) -> str:
    fd, path = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def export_run(run_dir: str | Path, out: str | Path, network: str = "best", checkpoint: str = "best",
               fmt: str | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Export ``run_dir``'s network to ``out`` with its model card; returns the card."""
    out = Path(out)
    if out.is_dir():
        raise ExportError(f"--out {out} is a folder; give a file name, e.g. {out / 'model.safetensors'}")
    fmt = _format_of(out, fmt)
    selected = open_run(run_dir, checkpoint, network, overrides)
    if out.resolve() == selected.checkpoint.resolve():
        raise ExportError(f"--out {out} is the checkpoint being exported; give another file name")
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.randn(2, *_input_shape(selected), generator=torch.Generator().manual_seed(0))
    temps = [_temporary(out.parent, out.name + suffix) for suffix in ("", ".card.json", ".card.md")]
    try:
        try:
            WRITERS[fmt](selected.module, example, temps[0])
        except ExportError:
            raise
        except Exception as error:  # the exporter cannot take this model (an op, a control flow, a size)
            raise ExportError(f"{selected.network} ({' + '.join(selected.architecture)}) cannot be exported as {fmt}: "
                              f"{_reason(error)}; try another --format") from None
        _check_outputs(fmt, temps[0], selected.module, example)
        card = build_card(selected, fmt, out, sha256_of(temps[0]), sha256_of(selected.checkpoint), Path(run_dir))
        _write_text(temps[1], json.dumps(card, indent=2) + "\n")
        _write_text(temps[2], markdown(card))
        mode = 0o666 & ~_umask()  # what a plain open() would give (mkstemp makes 0600)
        for temp, final in zip(temps, (out, *card_paths(out))):
            os.chmod(temp, mode)
            os.replace(temp, final)
    finally:
        for temp in temps:
            Path(temp).unlink(missing_ok=True)
    return card


def _reason(error: BaseException) -> str:
    """The innermost cause's first line, without terminal colours (the exporters wrap the real reason)."""
    while error.__cause__ is not None:
        error = error.__cause__
    first = (re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first[:300]}"


def _input_shape(selected) -> list[int]:
    prep = preprocessing(selected.data)
    return [3 if prep["color"] == "RGB" else 1, *prep["size"]]


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
