"""``kdarena data inspect ROOT``: what an image folder or archive holds, and a picture of it.

Decodes (or loads from the cache) exactly as training does, then reports class count, images per
split and class (min / median / max), image size, per-channel mean/std, decode time and the cache
location, and writes a PNG grid with a few images of each class (the decoded pixels the network
is fed, before the random crop/flip).
"""
from __future__ import annotations

import os

import numpy as np

from .errors import ImageDataError
from .images import ImageSetInfo, load_image_set


def _summary(counts: list[int]) -> str:
    c = np.asarray(counts)
    if c.size == 0:
        return "0 images"
    return f"{int(c.sum())} images, per class min {int(c.min())} / median {int(np.median(c))} / max {int(c.max())}"


def sample_grid(images: np.ndarray, labels: np.ndarray, names: list[str], path: str,
                per_class: int = 8, max_classes: int = 20, seed: int = 0) -> str:
    """Write a PNG with ``per_class`` random images of each of the first ``max_classes`` classes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.RandomState(seed)
    shown = list(range(min(len(names), max_classes)))
    fig, axes = plt.subplots(len(shown), per_class, figsize=(per_class * 0.9 + 1.6, len(shown) * 0.9 + 0.4),
                             squeeze=False)
    for row, c in enumerate(shown):
        members = np.flatnonzero(labels == c)
        pick = rng.choice(members, size=min(per_class, members.size), replace=False) if members.size else []
        for col in range(per_class):
            ax = axes[row][col]
            ax.axis("off")
            if col < len(pick):
                img = images[pick[col]].transpose(1, 2, 0)
                ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                          interpolation="nearest", vmin=0, vmax=255)
        axes[row][0].text(-0.1, 0.5, names[c][:18], transform=axes[row][0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.2, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.05)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def inspect_images(root: str, name: str = "imagefolder", image_size: int | None = None, out: str | None = None,
                   workers: int = 2, cache_max_gb: float = 4.0, per_class: int = 8, progress: bool = True) -> tuple[str, ImageSetInfo]:
    """Decode/load ``root`` and return (report text, info); writes the sample grid PNG to ``out``
    (default: ``<archive or folder name>-samples.png`` in the current directory)."""
    got = load_image_set(root, name, image_size, cache_max_gb=cache_max_gb, workers=workers, progress=progress)
    if got is None:
        raise ImageDataError(f"{root}: decoded images exceed data.cache_max_gb={cache_max_gb}; pass --cache-max-gb with a larger value")
    train, test, info = got
    base = os.path.basename(info.root.rstrip("/"))
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    out = out or f"{base}-samples.png"
    sample_grid(train.images.numpy(), train.labels.numpy(), info.class_names, out, per_class=per_class)
    fmt = lambda v: "[" + ", ".join(f"{x:.4f}" for x in v) + "]"  # noqa: E731
    lines = [
        f"source       {info.root} ({info.kind})",
        f"classes      {len(info.classes)}: {', '.join(info.class_names[:10])}{' ...' if len(info.classes) > 10 else ''}",
        f"train        {_summary(info.counts['train'])}",
        f"{info.test_split:<12} {_summary(info.counts['test'])} (the test set)",
        f"image size   {train.channels}x{info.image_size}x{info.image_size}",
        f"mean         {fmt(info.mean)} (train, pixels in [0, 1])",
        f"std          {fmt(info.std)}",
        # one decode, one time: a load from the cache is a different thing, timed as such
        f"decode       {info.decode_seconds:.1f} s "
        + (f"when first decoded; loaded from the cache in {info.seconds:.1f} s" if info.from_cache else "(decoded now)"),
        f"cache        {info.cache or 'not written'}",
        f"skipped      {len(info.skipped)} file(s){': ' + info.skipped[0] if info.skipped else ''}",
        f"samples      {out}" + (" (the first 20 classes)" if len(info.classes) > 20 else ""),
    ]
    return "\n".join(lines), info
