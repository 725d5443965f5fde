"""The model card: what an exported network is, how to feed it, what it scored (``FILE.card.json``).

One model for the writer (:func:`kdarena.deploy.card.build_card`, for a file or for a network taken
from a run folder by :func:`kdarena.load_model`) and for the reader (``load_model``, ``kdarena
predict``): a card is a file like any other a user is handed, and its sha256 vouches for the model
file, not for the card itself. Fields, in the order written:

* ``kdarena_model_card`` (the card's schema version), ``file``, ``format`` (safetensors, torchscript,
  onnx; ``run`` for a network loaded from a run folder, which has no file and no sha256), ``sha256``
  of the exported file, ``created``;
* ``network`` (``net1`` or ``ensemble``), ``networks`` (their indices), ``architecture`` (registry
  names, one per network), ``output`` (``logits``, or for an ensemble ``log_mean_probabilities``);
* ``num_classes``, ``classes`` (class names, index = output column), ``input`` (shape C, H, W);
* ``preprocessing``: exactly what ``kdarena eval`` feeds the network;
* ``accuracy``: top-1/top-5 on val and test at the exported weights' epoch, at the last epoch and at
  the epoch of the best validation top-1 (from the run's epoch records; ``measured_in``: the precision
  the run evaluated in, e.g. bf16), and ``exported_file``: the exported network's own fp32 top-1/top-5,
  measured at export when the run's data was still where it trained (absent otherwise);
* ``source``: the run folder, the checkpoint, its sha256 and epoch; ``versions``; ``config``: the run's.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

CARD_VERSION = 1
#: The formats of an exported file; ``run`` is a card built in memory for a network of a run folder.
FILE_FORMATS = ("safetensors", "torchscript", "onnx")
#: Each file format as a sentence names it, article included ("is an ONNX export").
FORMAT_IN_PROSE = {"safetensors": "a safetensors", "torchscript": "a TorchScript", "onnx": "an ONNX"}

PositiveInt = Annotated[int, Field(ge=1)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
# Bounds checked before anything is built from a card (a tampered one set the memory used: image_size 8000
# reached 5.1 GB, an ensemble of 200 wrn28_10 built 7.9 GB of networks, a std of 1e-310 gave NaN probabilities).
MAX_SIDE = 1024  # pixels a side: above any resolution kdarena trains at
MAX_NETWORKS = 16  # networks of an exported ensemble
MAX_CLASSES = 100_000
MIN_STD = 1e-3  # a pixel std (on the 0..1 scale) below this scales inputs past what float32 holds
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class CardInput(_Strict):
    shape: Annotated[list[Side], Field(min_length=3, max_length=3)]
    dtype: str = "float32"
    layout: str = "NCHW"


class Preprocessing(_Strict):
    color: Literal["RGB", "L"]
    size: Annotated[list[Side], Field(min_length=2, max_length=2)]
    resize: Literal["area", "bilinear"]
    steps: list[str] = Field(default_factory=list)
    mean: list[Finite]
    std: list[Annotated[float, Field(ge=MIN_STD, allow_inf_nan=False)]]


class ModelCard(_Strict):
    kdarena_model_card: Literal[1]
    file: Optional[str] = None
    format: Literal["safetensors", "torchscript", "onnx", "run"]
    sha256: Optional[Sha256] = None
    created: Optional[str] = None
    network: str
    networks: Annotated[list[int], Field(max_length=MAX_NETWORKS)] = Field(default_factory=list)
    architecture: Annotated[list[str], Field(min_length=1, max_length=MAX_NETWORKS)]
    output: Literal["logits", "log_mean_probabilities"] = "logits"
    num_classes: Annotated[int, Field(ge=1, le=MAX_CLASSES)]
    classes: Annotated[list[str], Field(max_length=MAX_CLASSES)]
    input: CardInput
    preprocessing: Preprocessing
    accuracy: dict[str, Any] = Field(default_factory=dict)
    source: dict[str, Any] = Field(default_factory=dict)
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        channels, height, width = self.input.shape
        prep = self.preprocessing
        if (self.format in FILE_FORMATS) != (self.sha256 is not None):
            raise ValueError(f"a {self.format} card " + ("needs the sha256 of its file" if self.format in FILE_FORMATS
                                                         else "describes no file, so it has no sha256"))
        if self.network != "ensemble" and len(self.architecture) != 1:
            raise ValueError(f"network {self.network} is one network, but architecture names {len(self.architecture)}")
        if len(self.classes) != self.num_classes:
            raise ValueError(f"classes names {len(self.classes)} classes, num_classes says {self.num_classes}")
        if (channels, prep.color) not in ((3, "RGB"), (1, "L")) or len(prep.mean) != channels or len(prep.std) != channels:
            raise ValueError(f"input.shape has {channels} channels, preprocessing is {prep.color} with "
                             f"{len(prep.mean)} means and {len(prep.std)} stds")
        if prep.size != [height, width]:
            raise ValueError(f"preprocessing.size {prep.size} is not input.shape's {[height, width]}")
        return self

    def as_written(self) -> dict[str, Any]:
        return self.model_dump(exclude_unset=True)
