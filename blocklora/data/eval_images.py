"""Test images at evaluation resolution, decoded once per dataset and shared by every run.

Evaluation sees each test image as Resize(short side, bicubic) + CenterCrop, then normalization.
Everything before the normalization gives uint8 pixels, so that part is done once: the images go
into an (N, size, size, 3) uint8 array, memory-mapped from ``<cache_dir>/eval_images/<key>.npy``,
and every later run of the dataset (every method, shot count, seed and transfer) reads its batches
from there instead of decoding the JPEGs again. Batches are normalized exactly as torchvision's
``ToTensor`` + ``Normalize`` would, so accuracies are those of decoding on the fly.

The key is a sha256 of what the pixels depend on: the image folder, the entries' paths, the size
and the transform. The file is built under an exclusive lock (``<key>.npy.lock``), written beside its
final name and renamed into place, with its description (``<key>.json``) written last: two jobs
asking for it at once build it once, and a partial file is never read. A file whose size or
description does not match is rebuilt. Replacing images under the same paths is not detected:
delete ``eval_images/`` in the cache folder after doing so.

The whole file is reserved on disk (``posix_fallocate``) before it is mapped: writing to a mapped
page the disk has no room for kills the process with SIGBUS, so a full disk is a named error instead,
and leaves nothing behind. A temporary left by a build that was killed (ImageNet's is ~7.5 GB) is
removed by the next build, under the lock.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from blocklora.data.loading import read_image, resize_center_crop
from blocklora.io import atomic_path, exclusive, write_json

log = logging.getLogger("blocklora")

FORMAT = "blocklora-eval-images/1"
SUBDIR = "eval_images"


@dataclass
class EvalImages:
    """Test images as uint8 pixels (N, size, size, 3) with their labels."""

    pixels: np.ndarray
    labels: np.ndarray
    path: Path | None = None  # the memory-mapped file, when cached

    def __len__(self) -> int:
        return len(self.labels)

    def batches(
        self,
        batch_size: int,
        device: torch.device,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Normalized float batches (B, 3, size, size) on ``device``, with their labels, in order."""
        mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        for start in range(0, len(self), batch_size):
            chunk = torch.from_numpy(np.array(self.pixels[start : start + batch_size]))  # a copy off the map
            images = chunk.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            labels = torch.from_numpy(self.labels[start : start + batch_size]).to(device)
            yield images.sub_(mean_t).div_(std_t), labels


def cache_key(entries: Sequence[Sequence], image_root: str | Path, size: int) -> dict:
    """Everything the cached pixels depend on (its sha256 names the file)."""
    paths = hashlib.sha256("\n".join(str(e[0]) for e in entries).encode()).hexdigest()
    return {
        "format": FORMAT,
        "transform": "resize-short-side-bicubic+center-crop",
        "size": int(size),
        "image_root": str(Path(image_root).resolve()),
        "entries": paths,
        "count": len(entries),
    }


def decode(
    entries: Sequence[Sequence], image_root: str | Path, size: int, out: np.ndarray, *, threads: int = 1
) -> None:
    """Decode ``entries`` into ``out`` (N, size, size, 3) uint8 with ``threads`` threads (PIL frees the GIL)."""
    root = Path(image_root)

    def one(index: int) -> None:
        out[index] = np.asarray(resize_center_crop(read_image(root / str(entries[index][0])), size))

    if threads <= 1:
        for index in range(len(entries)):
            one(index)
        return
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for _ in pool.map(one, range(len(entries))):
            pass


def eval_images(
    entries: Sequence[Sequence],
    image_root: str | Path,
    size: int,
    *,
    cache_dir: str | Path | None = None,
    threads: int = 1,
) -> EvalImages:
    """The images of ``entries`` at evaluation resolution: from the cache in ``cache_dir`` (built on
    first use), or decoded into memory when ``cache_dir`` is None."""
    labels = np.asarray([int(e[1]) for e in entries], dtype=np.int64)
    shape = (len(entries), size, size, 3)
    if cache_dir is None:
        pixels = np.empty(shape, dtype=np.uint8)
        decode(entries, image_root, size, pixels, threads=threads)
        return EvalImages(pixels, labels)
    key = cache_key(entries, image_root, size)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    data = Path(cache_dir) / SUBDIR / f"{digest}.npy"
    meta = data.with_suffix(".json")
    with exclusive(data):
        pixels = _read(data, meta, key, shape)
        if pixels is None:
            log.info(
                "decoding %d test images into %s (once for every run of this dataset)", len(entries), data
            )
            meta.unlink(missing_ok=True)
            _remove_stale_temporaries(data)
            with atomic_path(data) as tmp:
                writable = _reserved_map(tmp, shape, data)
                decode(entries, image_root, size, writable, threads=threads)
                writable.flush()
                del writable
            write_json(meta, key)
            pixels = _read(data, meta, key, shape)
            assert pixels is not None, f"{data} was just written but does not read back"
    return EvalImages(pixels, labels, data)


def _remove_stale_temporaries(data: Path) -> None:
    """Temporaries of ``data`` left by a build that was killed (only the lock's holder builds it)."""
    for stale in data.parent.glob(f".{data.name}.*.tmp"):
        log.warning("removing %s, left by an interrupted build of %s", stale, data.name)
        stale.unlink(missing_ok=True)


def _reserved_map(tmp: Path, shape: tuple[int, ...], data: Path) -> np.memmap:
    """An (N, size, size, 3) uint8 .npy file at ``tmp``, every byte of it allocated on disk first,
    mapped for writing. A disk without room for it is an OSError naming the file and the room needed."""
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": shape,
    }
    nbytes = int(np.prod(shape))
    with open(tmp, "r+b") as f:
        np.lib.format.write_array_header_1_0(f, header)
        offset = f.tell()
        try:
            os.posix_fallocate(f.fileno(), 0, offset + nbytes)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"no room for the evaluation image cache {data}: it needs {_size(nbytes)} "
                f"({exc.strerror}); free space in {data.parent} or point the cache elsewhere",
            ) from None
    return np.memmap(tmp, dtype=np.uint8, mode="r+", offset=offset, shape=shape)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _read(data: Path, meta: Path, key: dict, shape: tuple[int, ...]) -> np.ndarray | None:
    """The cached pixels, or None (after saying why) when absent, incomplete or of another key."""
    if not meta.is_file():
        return None
    try:
        stored = json.loads(meta.read_text())
        pixels = np.load(data, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("eval image cache %s is unreadable (%s); decoding again", data, exc)
        return None
    if stored != key or pixels.shape != shape or pixels.dtype != np.uint8:
        log.warning("eval image cache %s does not match its description; decoding again", data)
        return None
    return pixels
