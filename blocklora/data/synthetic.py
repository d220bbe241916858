"""Procedural images for the offline demo: a captioned pre-training corpus and held-out downstream datasets.

Every image is a shape (circle, star, ...) filled with a colour and a pattern (striped, dotted, ...)
on a background, drawn with numpy at twice the output size and averaged down (anti-aliasing).
Everything is a pure function of the seed: the same seed gives the same bytes.

The downstream datasets are held out from the corpus in two ways. The corpus only has plain
dark-to-mid backgrounds, while downstream images sit on shifted styles: a mild one (a soft
gradient with a little noise) or strong ones (bright noise, strong colour gradients, clutter). And a quarter of the colour+shape
combinations never occur in the corpus: ``demo_combos`` asks for exactly those.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from blocklora.data.registry import DatasetSpec, register
from blocklora.io import atomic_path

IMAGE_SIZE = 32
SUPERSAMPLE = 2

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "ring", "heart", "crescent")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 30),
    "green": (40, 180, 50),
    "cyan": (30, 200, 210),
    "blue": (40, 70, 225),
    "purple": (140, 50, 200),
    "pink": (245, 120, 190),
}
PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered")
PATTERN_NOUNS = {"solid": "no pattern", "striped": "stripes", "dotted": "dots", "checkered": "checks"}
CORPUS_STYLES: tuple[str, ...] = ("plain",)
MILD_STYLES: tuple[str, ...] = ("soft",)
SHIFTED_STYLES: tuple[str, ...] = ("noisy", "gradient", "clutter")

CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {pattern} {shape}.",
    "a {color} {pattern} {shape}.",
    "a {pattern} {color} {shape}.",
    "a {shape} in {color} with {pattern_noun}.",
    "a photo of a {color} {shape}.",
    "a {color} {shape}.",
    "a photo of a {shape}.",
    "a {pattern} {shape}.",
    "a {shape} with {pattern_noun}.",
    "something {color}.",
    "{pattern} texture.",
    "a {color} {pattern} shape.",
)


def held_out_combo(color: str, shape: str) -> bool:
    """True for the colour+shape combinations that the corpus never shows (two colours per shape)."""
    return (list(COLORS).index(color) + 3 * SHAPES.index(shape)) % 4 == 0


HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(
    (c, s) for s in SHAPES for c in COLORS if held_out_combo(c, s)
)


@dataclass(frozen=True)
class Attributes:
    """What one image shows."""

    shape: str
    color: str
    pattern: str
    style: str


# ---------------------------------------------------------------- rendering


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Boolean mask of ``shape`` in local coordinates where the shape spans about [-1, 1]."""
    r = np.hypot(x, y)
    if shape == "circle":
        return r < 0.9
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) < 0.75
    if shape == "triangle":
        return (y < 0.6) & (y > 1.9 * np.abs(x) - 1.0)
    if shape == "star":
        theta = np.arctan2(x, -y)
        return r < 0.42 + 0.5 * np.maximum(np.cos(2.5 * theta) ** 2, 0) ** 3
    if shape == "cross":
        return ((np.abs(x) < 0.3) & (np.abs(y) < 0.9)) | ((np.abs(y) < 0.3) & (np.abs(x) < 0.9))
    if shape == "ring":
        return (r < 0.9) & (r > 0.5)
    if shape == "heart":
        u, v = x * 1.15, -y * 1.15 + 0.15
        return (u**2 + v**2 - 1) ** 3 - u**2 * v**3 < 0
    if shape == "crescent":
        return (r < 0.9) & (np.hypot(x - 0.45, y + 0.1) > 0.65)
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _pattern_mask(pattern: str, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of the pattern's second tone (False everywhere for solid)."""
    if pattern == "solid":
        return np.zeros_like(x, dtype=bool)
    freq = rng.uniform(2.6, 3.4)
    phase = rng.uniform(0, 2 * np.pi, size=2)
    if pattern == "striped":
        angle = rng.uniform(0, np.pi)
        return np.sin(freq * np.pi * (x * np.cos(angle) + y * np.sin(angle)) + phase[0]) > 0
    if pattern == "dotted":
        fx = (x * freq / 2 + phase[0] / (2 * np.pi)) % 1 - 0.5
        fy = (y * freq / 2 + phase[1] / (2 * np.pi)) % 1 - 0.5
        return np.hypot(fx, fy) < 0.24
    if pattern == "checkered":
        return np.sin(freq * np.pi / 1.4 * x + phase[0]) * np.sin(freq * np.pi / 1.4 * y + phase[1]) > 0
    raise ValueError(f"unknown pattern {pattern!r}; known: {', '.join(PATTERNS)}")


def _background(style: str, gx: np.ndarray, gy: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An H×W×3 float background in [0, 1]."""
    shape = (*gx.shape, 3)
    if style == "plain":
        level = rng.uniform(0.04, 0.4)
        tint = rng.uniform(-0.04, 0.04, size=3)
        return np.broadcast_to(np.clip(level + tint, 0, 1), shape).copy()
    if style == "soft":
        a, b = rng.uniform(0.1, 0.5, size=3), rng.uniform(0.1, 0.5, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (gx * np.cos(angle) + gy * np.sin(angle) + 1.5) / 3
        return np.clip(a + (b - a) * t[..., None] + rng.normal(0, 0.05, size=shape), 0, 1)
    if style == "noisy":
        level = rng.uniform(0.55, 0.85)
        return np.clip(level + rng.normal(0, 0.16, size=shape), 0, 1)
    if style == "gradient":
        a, b = rng.uniform(0.2, 1.0, size=3), rng.uniform(0.2, 1.0, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (gx * np.cos(angle) + gy * np.sin(angle) + 1.5) / 3
        return np.clip(a + (b - a) * t[..., None], 0, 1)
    if style == "clutter":
        bg = np.broadcast_to(rng.uniform(0.3, 0.7, size=3), shape).copy()
        for _ in range(int(rng.integers(6, 12))):
            cx, cy, rad = rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(0.05, 0.18)
            blob = np.hypot(gx - cx, gy - cy) < rad
            bg[blob] = rng.uniform(0, 1, size=3)
        return bg
    raise ValueError(
        f"unknown style {style!r}; known: {', '.join(CORPUS_STYLES + MILD_STYLES + SHIFTED_STYLES)}"
    )


def render(attributes: Attributes, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw one image (size × size × 3, uint8) with random size, position, rotation and tones."""
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n * 2 - 1
    gx, gy = np.meshgrid(coords, coords)
    bg = _background(attributes.style, gx, gy, rng)

    scale = rng.uniform(0.45, 0.7)
    cx, cy = rng.uniform(-1 + scale, 1 - scale, size=2) * 0.85
    angle = rng.uniform(-0.35, 0.35)
    dx, dy = (gx - cx) / scale, (gy - cy) / scale
    x = dx * np.cos(angle) + dy * np.sin(angle)
    y = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _shape_mask(attributes.shape, x, y)

    base = np.asarray(COLORS[attributes.color], dtype=float) / 255
    base = np.clip(base * rng.uniform(0.85, 1.1) + rng.uniform(-0.05, 0.05, size=3), 0, 1)
    second = base * rng.uniform(0.2, 0.4) if rng.random() < 0.5 else base + (1 - base) * rng.uniform(0.6, 0.8)
    tone = _pattern_mask(attributes.pattern, x, y, rng)
    fg = np.where(tone[..., None], second, base)

    image = np.where(mask[..., None], fg, bg)
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def _rng(seed: int, *salt: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *salt]))


def _salt(text: str) -> int:
    """A stable integer for a name (Python's hash() is salted per process)."""
    return int.from_bytes(text.encode()[:8].ljust(8, b"\0"), "little") % (2**32) + len(text)


# ---------------------------------------------------------------- pre-training corpus


def caption(attributes: Attributes, rng: np.random.Generator) -> str:
    """One of several caption templates for an image's attributes."""
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    return template.format(
        color=attributes.color,
        shape=attributes.shape,
        pattern=attributes.pattern,
        pattern_noun=PATTERN_NOUNS[attributes.pattern],
    )


def corpus_attributes(rng: np.random.Generator) -> Attributes:
    """Attributes of one corpus image: any pattern, plain style, never a held-out combination."""
    while True:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        color = list(COLORS)[int(rng.integers(len(COLORS)))]
        if not held_out_combo(color, shape):
            break
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    style = CORPUS_STYLES[int(rng.integers(len(CORPUS_STYLES)))]
    return Attributes(shape, color, pattern, style)


def make_corpus(n_images: int, seed: int) -> tuple[np.ndarray, list[str], list[Attributes]]:
    """Images (N × 32 × 32 × 3 uint8), captions and attributes of the pre-training corpus."""
    images = np.empty((n_images, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    captions, attributes = [], []
    for i in range(n_images):
        rng = _rng(seed, _salt("corpus"), i)
        attrs = corpus_attributes(rng)
        images[i] = render(attrs, rng)
        captions.append(caption(attrs, rng))
        attributes.append(attrs)
    return images, captions, attributes


CORPUS_FILE = "corpus.npz"


def write_corpus(out_dir: str | Path, n_images: int = 8000, seed: int = 0) -> Path:
    """Write the captioned corpus to ``out_dir/corpus.npz`` (atomically); returns its path."""
    images, captions, attributes = make_corpus(n_images, seed)
    path = Path(out_dir) / CORPUS_FILE
    meta = {"n_images": n_images, "seed": seed, "held_out_combos": [" ".join(c) for c in HELD_OUT_COMBOS]}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            images=images,
            captions=np.asarray(captions),
            attributes=np.asarray([[a.shape, a.color, a.pattern, a.style] for a in attributes]),
            meta=np.asarray(json.dumps(meta)),
        )
    return path


def load_corpus(corpus: str | Path) -> tuple[np.ndarray, list[str]]:
    """Images and captions from a corpus directory (or its corpus.npz)."""
    path = Path(corpus)
    if path.is_dir():
        path = path / CORPUS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"no demo corpus at {path}; write it with blocklora.data.synthetic.write_corpus"
        )
    with np.load(path) as data:
        return data["images"], [str(c) for c in data["captions"]]


# ---------------------------------------------------------------- downstream datasets


@dataclass(frozen=True)
class SyntheticDataset:
    """A downstream classification task over procedural images."""

    name: str
    title: str
    template: str
    classnames: tuple[str, ...]
    sample: Callable[[int, np.random.Generator], Attributes]  # class index -> attributes of one image
    per_class: tuple[int, int, int] = (16, 4, 40)  # train, val, test images per class
    image_dir: str = "images"


def _any_color(rng: np.random.Generator) -> str:
    return list(COLORS)[int(rng.integers(len(COLORS)))]


def _any_pattern(rng: np.random.Generator) -> str:
    return PATTERNS[int(rng.integers(len(PATTERNS)))]


def _shifted_style(rng: np.random.Generator) -> str:
    return SHIFTED_STYLES[int(rng.integers(len(SHIFTED_STYLES)))]


def _shapes_sample(label: int, rng: np.random.Generator) -> Attributes:
    return Attributes(SHAPES[label], _any_color(rng), _any_pattern(rng), "soft")


def _colors_sample(label: int, rng: np.random.Generator) -> Attributes:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    return Attributes(shape, list(COLORS)[label], _any_pattern(rng), _shifted_style(rng))


def _combos_sample(label: int, rng: np.random.Generator) -> Attributes:
    color, shape = HELD_OUT_COMBOS[label]
    return Attributes(shape, color, _any_pattern(rng), _shifted_style(rng))


DATASETS: dict[str, SyntheticDataset] = {
    d.name: d
    for d in (
        SyntheticDataset(
            name="demo_shapes",
            title="DemoShapes",
            template="a photo of a {}.",
            classnames=SHAPES,
            sample=_shapes_sample,
        ),
        SyntheticDataset(
            name="demo_colors",
            title="DemoColors",
            template="a photo of a {} shape.",
            classnames=tuple(COLORS),
            sample=_colors_sample,
        ),
        SyntheticDataset(
            name="demo_combos",
            title="DemoCombos",
            template="a photo of a {}.",
            classnames=tuple(f"{color} {shape}" for color, shape in HELD_OUT_COMBOS),
            sample=_combos_sample,
            per_class=(16, 4, 20),
        ),
    )
}


def get_synthetic(name: str) -> SyntheticDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown synthetic dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def make_dataset(name: str, seed: int = 0) -> Iterator[tuple[str, str, int, str, np.ndarray]]:
    """Yield (split, relative_path, label, classname, image) for every image of a synthetic dataset."""
    spec = get_synthetic(name)
    for label, classname in enumerate(spec.classnames):
        folder = classname.replace(" ", "_")
        index = 0
        for split_id, (split, count) in enumerate(zip(("train", "val", "test"), spec.per_class, strict=True)):
            for _ in range(count):
                rng = _rng(seed, _salt(name), label, split_id, index)
                image = render(spec.sample(label, rng), rng)
                yield split, f"{folder}/{index:04d}.png", label, classname, image
                index += 1


def write_dataset(name: str, data_root: str | Path, seed: int = 0) -> Path:
    """Write ``<data_root>/<name>/images/<class>/<i>.png`` and, last and atomically, ``split.json``."""
    spec = get_synthetic(name)
    root = Path(data_root) / name
    image_root = root / spec.image_dir
    split: dict[str, list[list]] = {"train": [], "val": [], "test": []}
    for part, rel, label, classname, image in make_dataset(name, seed):
        out = image_root / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(out, format="PNG")
        split[part].append([rel, label, classname])
    path = root / "split.json"
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(split) + "\n")
    return path


def write_all(data_root: str | Path, seed: int = 0, names: Sequence[str] | None = None) -> list[Path]:
    """Write every synthetic downstream dataset (or ``names``); returns the split files."""
    return [write_dataset(name, data_root, seed) for name in (names or list(DATASETS))]


def dataset_spec(dataset: SyntheticDataset) -> DatasetSpec:
    """The registry entry of a synthetic dataset (no sources: ``write_dataset`` makes it)."""
    n = len(dataset.classnames)
    return DatasetSpec(
        name=dataset.name,
        title=dataset.title,
        template=dataset.template,
        image_dir=dataset.image_dir,
        num_classes=n,
        split_sizes={
            part: count * n for part, count in zip(("train", "val", "test"), dataset.per_class, strict=True)
        },
        notes="procedural demo data: blocklora.data.synthetic.write_dataset",
        synthetic=True,
    )


for _dataset in DATASETS.values():
    register(dataset_spec(_dataset))
