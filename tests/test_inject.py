import pytest
import torch
from torch import nn

from blocklora import apply_adapters, count_trainable, load_backbone, merge_adapters, unmerge_adapters
from blocklora.inject import AdaptedAttention, adapted_attentions


def _outputs(backbone, images, prompts):
    with torch.no_grad():
        return backbone.encode_image(images), backbone.encode_text(prompts)


def _randomize_adapters(model):
    torch.manual_seed(3)
    for _, _, attn in adapted_attentions(model):
        for adapter in attn.adapters.values():
            adapter.lora_B.data.normal_(0, 0.05)


@pytest.fixture
def tiny(tiny_config, tiny_checkpoint):
    return load_backbone(tiny_config, str(tiny_checkpoint))


IMAGES = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
PROMPTS = ["a photo of a cat.", "a photo of a small red dog.", "x"]


@pytest.mark.parametrize("method", ["lora", "blocklora"])
def test_zero_init_adapted_model_equals_the_original(tiny, method):
    before = _outputs(tiny, IMAGES, PROMPTS)
    apply_adapters(tiny.model, method, blocks=4, targets=("q", "k", "v", "o"))
    after = _outputs(tiny, IMAGES, PROMPTS)
    for a, b in zip(before, after, strict=True):
        assert (a - b).abs().max() <= 1e-5


def test_fused_and_separate_qkv_paths_agree(tiny):
    apply_adapters(tiny.model, "blocklora", blocks=4, targets=("q", "v", "o"))
    _randomize_adapters(tiny.model)
    fused = _outputs(tiny, IMAGES, PROMPTS)
    for _, _, attn in adapted_attentions(tiny.model):
        attn.fuse = False
    separate = _outputs(tiny, IMAGES, PROMPTS)
    for a, b in zip(fused, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_merged_model_runs_open_clip_modules_with_the_same_outputs(tiny):
    apply_adapters(tiny.model, "blocklora", blocks=8)
    _randomize_adapters(tiny.model)
    adapted = _outputs(tiny, IMAGES, PROMPTS)
    merge_adapters(tiny.model)
    kinds = {type(m) for m in tiny.model.modules()}
    assert AdaptedAttention not in kinds and nn.MultiheadAttention in kinds
    assert count_trainable(tiny.model) == 0
    for a, b in zip(adapted, _outputs(tiny, IMAGES, PROMPTS), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    unmerge_adapters(tiny.model)
    assert any(isinstance(m, AdaptedAttention) for m in tiny.model.modules())
    for a, b in zip(adapted, _outputs(tiny, IMAGES, PROMPTS), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unmerge_restores_the_frozen_weights(tiny):
    original = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    apply_adapters(tiny.model, "lora", targets=("q", "k", "v", "o"))
    _randomize_adapters(tiny.model)
    merge_adapters(tiny.model)
    unmerge_adapters(tiny.model)
    merge_adapters(tiny.model)
    unmerge_adapters(tiny.model)
    state = tiny.model.state_dict()
    for key, value in original.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-6)


def test_gradients_reach_the_adapters_only(tiny):
    apply_adapters(tiny.model, "blocklora", blocks=4)
    _randomize_adapters(tiny.model)
    tiny.model.train()
    image = tiny.encode_image(IMAGES)
    text = tiny.encode_text(PROMPTS)
    (image @ text.T).sum().backward()
    for name, p in tiny.model.named_parameters():
        if "lora_" in name:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name


def test_subsets_of_encoders_layers_and_targets(tiny):
    apply_adapters(tiny.model, "lora", rank=4, encoders=("text",), layers=[1], targets=("v", "o"))
    # one text layer, v and o, each 4 * (64 + 64)
    assert count_trainable(tiny.model) == 2 * 4 * (64 + 64)
    names = [n for n, _, _ in adapted_attentions(tiny.model)]
    assert names == ["text.layer1"]


def test_bad_placements_are_clear_errors(tiny):
    with pytest.raises(ValueError, match="out of range"):
        apply_adapters(tiny.model, "lora", layers=[5])
    with pytest.raises(ValueError, match="targets"):
        apply_adapters(tiny.model, "lora", targets=("q", "mlp"))
    with pytest.raises(ValueError, match=r"blocks=3 does not divide its input width 64"):
        apply_adapters(tiny.model, "blocklora", blocks=3)
    with pytest.raises(ValueError, match="unknown adapter kind"):
        apply_adapters(tiny.model, "dora")


@pytest.mark.parametrize(("method", "expected"), [("lora", 184_320), ("blocklora", 103_680)])
def test_vit_b16_trainable_parameter_counts(method, expected):
    backbone = load_backbone("ViT-B-16", None)
    apply_adapters(backbone.model, method, rank=2, blocks=8)
    assert count_trainable(backbone.model) == expected
