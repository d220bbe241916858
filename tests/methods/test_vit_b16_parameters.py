"""Trainable parameters of each baseline on ViT-B/16 (random weights), against the reference's counts."""

from pathlib import Path

import pytest
import torch

from blocklora.clip import load_backbone
from blocklora.inject import count_parameters
from blocklora.methods import FewShotTask, get_method, resolve_hparams

CLASSES = 2


@pytest.fixture(scope="module")
def vit_b16():
    torch.manual_seed(0)
    backbone = load_backbone("ViT-B-16", None)
    backbone.model.requires_grad_(False)
    return backbone


@pytest.mark.parametrize(
    ("method", "expected"),
    [
        ("coop", 8_192),  # 16 × 512
        ("cocoop", 35_360),  # 4 × 512 + (512 · 32 + 32) + (32 · 512 + 512)
        ("kgcoop", 2_048),  # 4 × 512
        ("prograd", 8_192),  # 16 × 512
        ("taskres", 512 * CLASSES),  # a residual per class
        ("maple", 3_555_072),  # 2 × 512 context + Linear(512, 768), and 8 × the same deeper
        ("promptsrc", 46_080),  # 9 × 4 × 512 text + 9 × 4 × 768 image
        # EuroSAT's first template has 5 words: 4 text prompts of 5 tokens, 4 image prompts of 2
        ("plotpp", 4 * 5 * 512 + 6_144),
    ],
)
def test_trainable_parameters_on_vit_b16_equal_the_references(vit_b16, method, expected):
    cls = get_method(method)
    task = FewShotTask(
        dataset="eurosat",
        classnames=[f"class {i}" for i in range(CLASSES)],
        template="a centered satellite photo of {}.",
        train=[],
        val=[],
        test=[],
        image_root=Path("."),
        shots=16,
        seed=1,
    )
    instance = cls(vit_b16, task, resolve_hparams(cls, {}, dataset="eurosat", shots=16))
    instance.setup()
    trainable, _ = count_parameters([vit_b16.model, *instance.extra_modules()])
    assert trainable == expected
