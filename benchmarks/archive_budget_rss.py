"""Peak memory of loading an archive that holds a 1 GiB member of zeros named ``.jpg`` (issue 27, point 3).

For each archive kind (zip, tar.gz, plain tar) this writes, under ``--tmp``, a tiny valid image data
set plus ``ds/train/a/huge.jpg`` (1 GiB of zeros, streamed into the archive: never a 1 GiB buffer),
then loads it with ``kdarena.data.images.load_image_set(cache_max_gb=...)`` in a fresh Python
process and reports that process's peak RSS (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``)
and how the load ended.  ``--kdarena-src DIR`` runs another checkout's ``kdarena`` (e.g. the code
before the fix, from ``git archive``).  Every file it wrote is deleted at the end.

    python benchmarks/archive_budget_rss.py --cache-max-gb 0.1
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

MEMBER = "ds/train/a/huge.jpg"
GIB = 1 << 30

CHILD = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from kdarena.data.images import load_image_set
try:
    got = load_image_set(sys.argv[1], cache_max_gb=float(sys.argv[2]), workers=1, progress=False)
    print(json.dumps({"outcome": "loaded" if got else "streamed"}))
except Exception as e:
    print(json.dumps({"outcome": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
"""


class Zeros(io.RawIOBase):
    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.left)
        b[:k] = bytes(k)
        self.left -= k
        return k


def small_images() -> dict[str, bytes]:
    import numpy as np
    from PIL import Image

    out = {}
    for split in ("train", "val"):
        for c, value in (("a", 10), ("b", 200)):
            for k in range(4):
                buf = io.BytesIO()
                Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(buf, format="PNG")
                out[f"ds/{split}/{c}/{k}.png"] = buf.getvalue()
    return out


def write_archive(path: str, n: int) -> None:
    files = small_images()
    if path.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            for name, data in files.items():
                z.writestr(name, data)
            with z.open(MEMBER, "w", force_zip64=True) as w:
                shutil.copyfileobj(Zeros(n), w, 1 << 20)
        return
    with tarfile.open(path, "w:gz" if path.endswith(".gz") else "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(MEMBER)
        info.size = n
        tar.addfile(info, Zeros(n))


def measure(archive: str, cache_max_gb: float, src: str | None, cache: str) -> dict:
    env = dict(os.environ, KDARENA_CACHE=cache, OMP_NUM_THREADS="1")
    if src:
        env["PYTHONPATH"] = src
    run = subprocess.run([sys.executable, "-c", CHILD, archive, str(cache_max_gb)], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(archive))  # not a checkout's root: its kdarena/ would shadow --kdarena-src
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest child so far: the only one here
    outcome = json.loads(run.stdout.strip().splitlines()[-1])["outcome"] if run.stdout.strip() else run.stderr[-300:]
    return {"archive_bytes": os.path.getsize(archive), "peak_rss_mb": round(peak_kb / 1024, 1), "outcome": outcome}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache-max-gb", type=float, default=0.1)
    parser.add_argument("--member-bytes", type=int, default=GIB)
    parser.add_argument("--kinds", default="zip,tar.gz,tar")
    parser.add_argument("--kdarena-src", help="a folder holding another kdarena package to measure instead")
    parser.add_argument("--tmp", default=tempfile.gettempdir())
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="kdarena-rss-", dir=args.tmp)
    try:
        baseline = measure_baseline(args.kdarena_src)
        print(json.dumps({"python_import_kdarena_peak_rss_mb": baseline}))
        for kind in args.kinds.split(","):
            archive = os.path.join(work, f"zeros.{kind}")
            write_archive(archive, args.member_bytes)
            # one child per kind, each measured by a fresh interpreter so RUSAGE_CHILDREN's maximum is its own
            out = subprocess.run([sys.executable, __file__, "--child", archive, str(args.cache_max_gb), args.kdarena_src or "",
                                  os.path.join(work, "cache")], capture_output=True, text=True, check=True)
            print(json.dumps({"kind": kind, "cache_max_gb": args.cache_max_gb, **json.loads(out.stdout)}))
            os.unlink(archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure_baseline(src: str | None) -> float:
    env = dict(os.environ, **({"PYTHONPATH": src} if src else {}))
    subprocess.run([sys.executable, "-c", "import kdarena.data.images, PIL.Image"], env=env, check=True, cwd=tempfile.gettempdir())
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        _, _, archive, gb, src, cache = sys.argv
        print(json.dumps(measure(archive, float(gb), src or None, cache)))
    else:
        main()
