"""Images in, tensors out: the train and test transforms of the CLIP-LoRA protocol.

Training images are decoded once and kept as uint8 tensors (on the GPU when there is one);
random resized crop, flip and normalization run on the device for a whole batch. Test images go
through a DataLoader with Resize(short side, bicubic) + CenterCrop + normalize. A missing or
unreadable image stops the run with its path: nothing is skipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T


class ImageReadError(RuntimeError):
    """An image that is missing, truncated or not an image."""


def read_image(path: Path) -> Image.Image:
    """Open ``path`` as RGB, fully decoded; errors name the file and what to do."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except FileNotFoundError as exc:
        raise ImageReadError(
            f"image not found: {path}; the dataset folder is incomplete: rerun its prepare step "
            "(snakemake deletes and rebuilds it when you remove its split.json)"
        ) from exc
    except Exception as exc:
        raise ImageReadError(
            f"cannot decode image {path} ({exc}); replace the file or re-download the dataset"
        ) from exc


def eval_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize the short side to ``size`` (bicubic), center-crop, normalize."""
    return T.Compose([*_resize_center_crop(size), T.ToTensor(), T.Normalize(mean, std)])


def _resize_center_crop(size: int) -> list:
    return [T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """The pixel part of :func:`eval_transform`: resize the short side (bicubic), center-crop."""
    for step in _resize_center_crop(size):
        image = step(image)
    return image


def train_transform(
    size: int, mean: Sequence[float], std: Sequence[float], scale: Sequence[float] = (0.08, 1.0)
) -> T.Compose:
    """RandomResizedCrop (bicubic) + horizontal flip + normalize, on PIL images."""
    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class ImageList(Dataset):
    """``[relative_path, label, classname]`` entries under ``root``, through ``transform``."""

    def __init__(self, entries: Sequence[Sequence], root: str | Path, transform) -> None:
        self.entries = [(str(e[0]), int(e[1])) for e in entries]
        self.root = Path(root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.entries[index]
        return self.transform(read_image(self.root / path)), label


def decode_uint8(entries: Sequence[Sequence], root: str | Path, *, threads: int = 8) -> list[torch.Tensor]:
    """Decode every image once to a (3, H, W) uint8 tensor, in entry order."""
    root = Path(root)

    def one(entry: Sequence) -> torch.Tensor:
        array = np.asarray(read_image(root / str(entry[0])), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(one, entries))


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel with PIL's a = -0.5 (PyTorch's antialiased bicubic)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_weights(offsets: torch.Tensor, lengths: torch.Tensor, size: int, extent: int) -> torch.Tensor:
    """Per-sample 1-D resampling matrices, shape ``(n, size, extent)``.

    Row ``o`` of matrix ``b`` holds the weights with which output pixel ``o`` mixes source
    pixels ``0 … extent-1`` when the window ``[offsets[b], offsets[b] + lengths[b])`` is resized
    to ``size`` pixels with ``F.interpolate(mode="bicubic", antialias=True, align_corners=False)``:
    the same kernel, support and window bounds (PyTorch's ``_compute_weights_aa``), so that
    ``Wy @ image @ Wxᵀ`` is that resize of the crop, for a whole batch of crop sizes at once.
    """
    device = offsets.device
    lengths = lengths.to(device=device, dtype=torch.float32)[:, None, None]
    offsets = offsets.to(device=device, dtype=torch.float32)[:, None, None]
    out = torch.arange(size, device=device, dtype=torch.float32)[None, :, None]
    source = torch.arange(extent, device=device, dtype=torch.float32)[None, None, :] - offsets
    scale = lengths / size
    support = torch.where(scale >= 1, 2 * scale, torch.full_like(scale, 2.0))
    inv_scale = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale * (out + 0.5)
    low = (center - support + 0.5).trunc().clamp(min=0)
    high = torch.minimum((center + support + 0.5).trunc(), lengths)
    inside = (source >= low) & (source < high)
    weights = torch.where(inside, _cubic((source - center + 0.5) * inv_scale), 0.0)
    total = weights.sum(-1, keepdim=True)
    return weights / torch.where(total == 0, torch.ones_like(total), total)


class DeviceAugment:
    """RandomResizedCrop + flip + normalize for a batch of uint8 images kept on the device.

    Crop boxes follow torchvision's RandomResizedCrop.get_params (10 tries, then a center
    crop at the clamped ratio). Each crop is resized with bicubic interpolation, antialiased when
    shrinking, as the PIL transform does. Two ways, equal to within float rounding (tested):

    - ``batched=True`` (the default on CUDA): the resize is separable, so the whole batch is
      resized by two batched matmuls with per-sample weight matrices (:func:`resize_weights`),
      the flip being a reversal of a weight matrix's rows: a handful of kernel launches per
      batch instead of several per image. When every image has one size the images are stacked
      once and a batch is gathered from the stack; otherwise the crops are copied into a
      zero-padded buffer. Either way in chunks of at most ``max_chunk_elements`` source pixels
      (one chunk for ordinary image sizes), so that very large images stay within memory.
    - ``batched=False`` (the default on CPU): ``F.interpolate`` crop by crop, whose banded
      kernels do far less arithmetic than the dense matmuls, which is what counts on a CPU.
    """

    def __init__(
        self,
        images: list[torch.Tensor],
        size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: torch.device,
        scale: Sequence[float] = (0.08, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        generator: torch.Generator | None = None,
        batched: bool | None = None,
        max_chunk_elements: int = 1 << 26,
    ) -> None:
        if not images:
            raise ValueError("no images to augment: the few-shot training set is empty")
        self.batched = device.type == "cuda" if batched is None else batched
        self.stacked = None
        if self.batched and len({tuple(img.shape) for img in images}) == 1:
            # stacked on the host, so that the device holds the images once
            self.stacked = torch.stack(list(images)).to(device, non_blocking=True)
            self.images = list(self.stacked.unbind(0))
        else:
            self.images = [img.to(device, non_blocking=True) for img in images]
        self.size = size
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = tuple(ratio)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.generator = generator
        self.max_chunk_elements = max_chunk_elements

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        area = height * width
        g = self.generator
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale, generator=g).item()
            aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio, generator=g).item())
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                i = int(torch.randint(0, height - h + 1, (1,), generator=g).item())
                j = int(torch.randint(0, width - w + 1, (1,), generator=g).item())
                return i, j, h, w
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            h, w = height, round(height * self.ratio[1])
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, indices: Sequence[int]) -> torch.Tensor:
        indices = [int(i) for i in indices]
        flips = torch.rand(len(indices), generator=self.generator) < 0.5
        boxes = [self._box(*self.images[i].shape[1:]) for i in indices]
        if not self.batched:
            batch = torch.cat(
                [self._interpolate(i, box, flip) for i, box, flip in zip(indices, boxes, flips, strict=True)]
            )
        else:
            batch = torch.empty(len(indices), 3, self.size, self.size, device=self.device)
            for chunk, source, origin in self._sources(indices, boxes):
                batch[torch.tensor(chunk, device=self.device)] = self._resample(source, origin, flips[chunk])
        return (batch.clamp_(0, 255).div_(255) - self.mean) / self.std

    def _interpolate(self, index: int, box: tuple[int, int, int, int], flip: torch.Tensor) -> torch.Tensor:
        i, j, h, w = box
        crop = self.images[index][None, :, i : i + h, j : j + w].float()
        crop = F.interpolate(
            crop, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
        )
        return crop.flip(-1) if flip else crop

    def _sources(
        self, indices: list[int], boxes: list[tuple[int, int, int, int]]
    ) -> Iterator[tuple[list[int], torch.Tensor, list[tuple[int, int, int, int]]]]:
        """``(batch positions, uint8 source images, boxes within them)`` per chunk of the batch.

        One size: slices of the stack, whole images per chunk. Otherwise: the crops, largest first,
        copied to the top-left corner of a zero-padded buffer. Either way each chunk holds at most
        ``max_chunk_elements`` source pixels (or a single image or crop that alone exceeds it).
        """
        if self.stacked is not None:
            per = max(1, self.max_chunk_elements // self.stacked[0].numel())
            for k in range(0, len(indices), per):
                chunk = list(range(k, min(k + per, len(indices))))
                yield (
                    chunk,
                    self.stacked[torch.tensor(indices[k : k + per], device=self.device)],
                    boxes[k : k + per],
                )
            return
        for chunk in self._chunks(boxes):
            crops = [boxes[n] for n in chunk]
            buffer = torch.zeros(
                len(chunk),
                3,
                max(b[2] for b in crops),
                max(b[3] for b in crops),
                dtype=torch.uint8,
                device=self.device,
            )
            for k, (n, (i, j, h, w)) in enumerate(zip(chunk, crops, strict=True)):
                buffer[k, :, :h, :w] = self.images[indices[n]][:, i : i + h, j : j + w]
            yield chunk, buffer, [(0, 0, h, w) for _, _, h, w in crops]

    def _chunks(self, boxes: list[tuple[int, int, int, int]]) -> list[list[int]]:
        """Batch positions grouped, largest crops first, so each padded buffer fits the budget."""
        order = sorted(range(len(boxes)), key=lambda n: boxes[n][2] * boxes[n][3], reverse=True)
        chunks: list[list[int]] = []
        height = width = 0
        for n in order:
            h, w = boxes[n][2], boxes[n][3]
            grown = (len(chunks[-1]) + 1) * 3 * max(height, h) * max(width, w) if chunks else None
            if grown is not None and grown <= self.max_chunk_elements:
                chunks[-1].append(n)
                height, width = max(height, h), max(width, w)
            else:
                chunks.append([n])
                height, width = h, w
        return chunks

    def _resample(
        self, source: torch.Tensor, boxes: list[tuple[int, int, int, int]], flips: torch.Tensor
    ) -> torch.Tensor:
        """Resize box ``b`` of ``source[b]`` to size × size (flipped where ``flips[b]``), as floats."""
        top, left, height, width = (
            torch.tensor(column, device=self.device) for column in zip(*boxes, strict=True)
        )
        rows = resize_weights(top, height, self.size, source.shape[2])
        cols = resize_weights(left, width, self.size, source.shape[3])
        flip = flips.to(self.device)[:, None, None]
        cols = torch.where(flip, cols.flip(1), cols)
        # (n, 1, S, H) @ (n, 3, H, W) @ (n, 1, W, S): vertical then horizontal pass, per sample
        return rows[:, None] @ source.float() @ cols.transpose(1, 2)[:, None]
