"""What a run's networks take in, as evaluation feeds them: built from the run's data when it starts training,
kept in the run folder (``inputs.json``, :class:`kdarena.records.inputs.RunInputs`) and copied into every model card."""
from __future__ import annotations

from typing import Any

from ..data.datasets import ArrayDataset
from ..records.inputs import RunInputs

RESIZE_STEPS = {
    "area": "resize so the shorter side is {s} (Pillow BOX filter, the area average, when shrinking; BICUBIC when "
            "enlarging), centre-crop {s} x {s} (kdarena.data.decode.decode_bytes)",
    "bilinear": "JPEG draft-mode downscale, resize so the shorter side is {s} (Pillow BILINEAR), centre-crop {s} x {s} "
                "(kdarena.data.imagefolder.decode_image)",
}


def preprocessing(data) -> dict[str, Any]:
    """How the run's evaluation decodes and normalises an image (in-memory sets and streamed folders differ)."""
    loader = data.test if data.test is not None else data.train  # every split is decoded and normalised alike
    dataset = getattr(loader, "dataset", None)
    if isinstance(dataset, ArrayDataset):
        channels, height, width = (int(v) for v in dataset.images.shape[1:])
        mean, std, resize = dataset.mean, dataset.std, "area"
    else:  # a streamed image folder (FolderLoader over an ImageFolder)
        channels, height, width = dataset.image_shape
        mean, std, resize = loader.mean, loader.std, "bilinear"
    return {
        "color": "RGB" if channels == 3 else "L",
        "size": [height, width],
        "resize": resize,
        "steps": [f"decode to {'RGB' if channels == 3 else 'L (grayscale)'}", RESIZE_STEPS[resize].format(s=height),
                  "float32 x * (1 / (255 std)) - mean / std per channel, i.e. (x / 255 - mean) / std", "NCHW batch"],
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
    }


def run_inputs(data) -> RunInputs:
    """What the networks of a run on ``data`` take in: recorded in the run folder (``inputs.json``) when it
    starts training, so its export and ``kdarena predict RUN`` need not find the data again."""
    prep = preprocessing(data)
    channels = 3 if prep["color"] == "RGB" else 1
    return RunInputs.model_validate({"num_classes": data.num_classes, "classes": list(data.classes),
                                     "input": {"shape": [channels, *prep["size"]]}, "preprocessing": prep})
