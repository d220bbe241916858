"""Images in, tensors out: the train and test transforms of the CLIP-LoRA protocol.

Training images are decoded once and kept as uint8 tensors (on the GPU when there is one);
random resized crop, flip and normalization run on the device for a whole batch. Test images go
through a DataLoader with Resize(short side, bicubic) + CenterCrop + normalize. A missing or
unreadable image stops the run with its path: nothing is skipped silently.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
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
    return T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


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


def image_loader(
    entries: Sequence[Sequence],
    root: str | Path,
    transform,
    *,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> DataLoader:
    return DataLoader(
        ImageList(entries, root, transform),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )


def decode_uint8(entries: Sequence[Sequence], root: str | Path, *, threads: int = 8) -> list[torch.Tensor]:
    """Decode every image once to a (3, H, W) uint8 tensor, in entry order."""
    root = Path(root)

    def one(entry: Sequence) -> torch.Tensor:
        array = np.asarray(read_image(root / str(entry[0])), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return list(pool.map(one, entries))


class DeviceAugment:
    """RandomResizedCrop + flip + normalize for a batch of uint8 images kept on the device.

    Crop boxes follow torchvision's RandomResizedCrop.get_params (10 tries, then a center
    crop at the clamped ratio); each crop is resized with bicubic interpolation (antialiased
    when shrinking), as the PIL transform does.
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
    ) -> None:
        self.images = [img.to(device, non_blocking=True) for img in images]
        self.size = size
        self.scale = tuple(scale)
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.ratio = tuple(ratio)
        self.device = device
        self.mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self.generator = generator

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
        crops = []
        flips = torch.rand(len(indices), generator=self.generator) < 0.5
        for n, index in enumerate(indices):
            img = self.images[int(index)]
            i, j, h, w = self._box(img.shape[1], img.shape[2])
            crop = img[None, :, i : i + h, j : j + w].float()
            crop = F.interpolate(
                crop, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True
            )
            if flips[n]:
                crop = crop.flip(-1)
            crops.append(crop)
        batch = torch.cat(crops).clamp_(0, 255).div_(255)
        return (batch - self.mean) / self.std
