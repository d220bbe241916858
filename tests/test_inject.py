import inspect

import pytest
import torch
from torch import nn

from blocklora import apply_adapters, count_trainable, load_backbone, merge_adapters, unmerge_adapters
from blocklora.inject import AdaptedAttention, adapted_attentions, count_parameters


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


def _attention(dropout: float, *, fuse: bool = True, same: bool = False) -> AdaptedAttention:
    """Self-attention of width 32 with q, k, v adapters (n = 4), B non-zero; ``same``: identical adapters."""
    from blocklora.adapters import LowRankAdapter

    torch.manual_seed(0)
    adapters = {t: LowRankAdapter(32, 32, rank=2, blocks=4, dropout=dropout) for t in "qkv"}
    for adapter in adapters.values():
        adapter.lora_B.data.normal_(0, 0.5)
        if same:
            adapter.lora_A.data.copy_(adapters["q"].lora_A.data)
            adapter.lora_B.data.copy_(adapters["q"].lora_B.data)
    return AdaptedAttention(nn.MultiheadAttention(32, 4, batch_first=True), adapters, fuse=fuse)


def _deltas(attention: AdaptedAttention, x: torch.Tensor) -> torch.Tensor:
    """The adapters' part of q, k, v: (3, ..., width)."""
    frozen = torch.nn.functional.linear(x, attention.in_proj_weight, attention.in_proj_bias)
    if attention.fuse:
        adapted = attention._project_qkv_fused(x)
    else:
        adapted = torch.cat([attention._project(x, t) for t in "qkv"], dim=-1)
    return torch.stack((adapted - frozen).chunk(3, dim=-1))


X = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fuse", [True, False])
def test_adapter_dropout_makes_two_training_passes_differ(fuse):
    attention = _attention(0.25, fuse=fuse).train()
    assert not torch.allclose(_deltas(attention, X), _deltas(attention, X))
    attention.eval()
    torch.testing.assert_close(_deltas(attention, X), _deltas(attention, X))


@pytest.mark.parametrize("fuse", [True, False])
def test_q_k_and_v_each_draw_their_own_dropout_mask(fuse):
    q, k, v = _deltas(_attention(0.25, fuse=fuse, same=True).train(), X)  # identical adapters
    assert not torch.allclose(q, k) and not torch.allclose(k, v) and not torch.allclose(q, v)


def test_fused_and_unfused_agree_exactly_without_dropout_and_in_expectation_with_it():
    for mode in ("train", "eval"):
        fused, unfused = _attention(0.0), _attention(0.0, fuse=False)
        fused.train(mode == "train")
        unfused.train(mode == "train")
        torch.testing.assert_close(_deltas(fused, X), _deltas(unfused, X), rtol=1e-5, atol=1e-6)
    expected = _deltas(_attention(0.25).eval(), X)
    with torch.no_grad():
        for fuse in (True, False):
            attention = _attention(0.25, fuse=fuse).train()
            mean = torch.stack([_deltas(attention, X) for _ in range(4000)]).mean(0)
            assert (mean - expected).abs().max() < 0.05 * expected.abs().max(), fuse


def _zero_adapted(mha: nn.MultiheadAttention, targets: str = "qkv", **kwargs) -> AdaptedAttention:
    """``mha`` behind adapters whose B is zero: it must compute exactly what ``mha`` computes."""
    from blocklora.adapters import LowRankAdapter

    adapters = {t: LowRankAdapter(32, 32, rank=2, blocks=4, dropout=0.25) for t in targets}
    return AdaptedAttention(mha, adapters, **kwargs).eval()


def _mha(**kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    return nn.MultiheadAttention(32, 4, **{"batch_first": True, **kwargs}).eval()


Y = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(2))
Z = torch.randn(4, 5, 32, generator=torch.Generator().manual_seed(3))
W = torch.randn(4, 7, 32, generator=torch.Generator().manual_seed(4))
CAUSAL = torch.ones(7, 7, dtype=torch.bool).triu(1)


@pytest.mark.parametrize(
    ("mha_kwargs", "targets", "inputs"),
    [
        ({}, "qkv", (X,)),  # self-attention, fused
        ({}, "o", (X,)),  # no q/k/v adapter: nothing to fuse
        ({}, "q", (X,)),  # one q/k/v adapter: fused alone
        ({}, "qkv", (X, Y, Y)),  # cross-attention: keys and values are one tensor
        ({}, "qkv", (X, Y, Z)),  # ... or two
        ({}, "qkv", (X, X, W)),  # query is key, value is not
        ({"bias": False}, "qkv", (X, Y, Y)),  # no in_proj bias
        ({"dropout": 0.3}, "qkv", (X,)),  # attention dropout: off in eval mode
        ({"batch_first": False}, "qkv", (X.transpose(0, 1),)),  # open_clip's older layout
        ({"batch_first": False}, "qkv", (X.transpose(0, 1), Y.transpose(0, 1), Y.transpose(0, 1))),
    ],
)
def test_zero_adapters_compute_what_multihead_attention_computes(mha_kwargs, targets, inputs):
    mha = _mha(**mha_kwargs)
    query, key, value = (inputs * 3)[:3] if len(inputs) == 1 else inputs
    expected, _ = mha(query, key, value, need_weights=False)
    adapted, weights = _zero_adapted(mha, targets)(*inputs)
    assert weights is None
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)


def test_is_causal_without_a_mask_masks_the_future():
    mha = _mha()
    expected, _ = mha(X, X, X, attn_mask=CAUSAL, need_weights=False, is_causal=True)
    adapted, _ = _zero_adapted(mha)(X, is_causal=True)
    torch.testing.assert_close(adapted, expected, rtol=1e-5, atol=1e-6)
    unmasked, _ = _zero_adapted(mha)(X)
    assert not torch.allclose(adapted, unmasked)


def test_attention_weights_and_padding_masks_are_refused_by_name():
    attention = _zero_adapted(_mha())
    with pytest.raises(NotImplementedError, match="need_weights=False without key_padding_mask"):
        attention(X, X, X, need_weights=True)
    with pytest.raises(NotImplementedError, match="need_weights=False without key_padding_mask"):
        attention(X, X, X, key_padding_mask=torch.zeros(4, 7, dtype=torch.bool))


@pytest.mark.parametrize("kwargs", [{"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 16, "vdim": 16}])
def test_attention_this_surgery_cannot_reproduce_is_refused(kwargs):
    with pytest.raises(ValueError, match=r"only nn\.MultiheadAttention with a fused in_proj"):
        _zero_adapted(_mha(**kwargs))


def _spy_fused(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = AdaptedAttention._project_qkv_fused

    def spied(self, x):
        calls.append(1)
        return original(self, x)

    monkeypatch.setattr(AdaptedAttention, "_project_qkv_fused", spied)
    return calls


def test_like_qkv_adapters_take_one_fused_projection_by_default_and_unlike_ones_three(monkeypatch):
    from blocklora.adapters import LowRankAdapter

    calls = _spy_fused(monkeypatch)
    attention = _attention(0.0).eval()
    attention.fuse = AdaptedAttention(_mha(), {}).fuse  # the default
    fused, _ = attention(X)
    assert calls == [1]
    attention.fuse = False
    separate, _ = attention(X)
    assert calls == [1]
    torch.testing.assert_close(fused, separate, rtol=1e-5, atol=1e-6)

    torch.manual_seed(0)
    unlike = {"q": LowRankAdapter(32, 32, rank=2, blocks=4), "v": LowRankAdapter(32, 32, rank=2, blocks=2)}
    for adapter in unlike.values():
        adapter.lora_B.data.normal_(0, 0.5)
    attention = AdaptedAttention(_mha(), unlike, fuse=True).eval()
    out, _ = attention(X)
    assert calls == [1]  # not fused: the two adapters cut the input differently
    attention.fuse = False
    torch.testing.assert_close(out, attention(X)[0])


def test_a_merged_attention_adds_its_adapters_once():
    attention = _attention(0.0).eval()
    before, _ = attention(X)
    attention.merge()
    after, _ = attention(X)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_layer_indices_count_from_either_end(tiny):
    apply_adapters(tiny.model, "lora", encoders=("text",), layers=[-2])  # 2 layers: -2 is the first
    assert [n for n, _, _ in adapted_attentions(tiny.model)] == ["text.layer0"]
    for layers in ([2], [-3]):
        with pytest.raises(ValueError, match=rf"layers \[{layers[0]}\] out of range .* with 2 layers"):
            apply_adapters(load_backbone(tiny.name, None).model, "lora", layers=layers)


def test_no_targets_is_an_error(tiny):
    with pytest.raises(ValueError, match=r"targets must be a non-empty subset"):
        apply_adapters(tiny.model, "lora", targets=())


def test_apply_adapters_defaults_are_block_loras_protocol_defaults(tiny):
    from blocklora.methods.lora import BlockLoRA

    parameters = inspect.signature(apply_adapters).parameters
    for name in ("rank", "alpha", "dropout", "blocks", "scaling", "layers", "fuse", "init"):
        assert parameters[name].default == BlockLoRA.defaults[name], name
    for name in ("targets", "encoders"):
        assert list(parameters[name].default) == BlockLoRA.defaults[name], name
    with pytest.raises(TypeError):
        apply_adapters(tiny.model, "lora", 4)  # options are keyword-only


def test_count_parameters_counts_each_tensor_once(tiny):
    apply_adapters(tiny.model, "lora")
    trainable, total = count_parameters(tiny.model)
    assert trainable == count_trainable(tiny.model) > 0
    assert total == sum(p.numel() for p in tiny.model.parameters())
    head = nn.Linear(32, 4)
    assert count_parameters([tiny.model, head, tiny.model]) == (trainable + 132, total + 132)


def test_a_merged_attention_refuses_to_train():
    attention = _attention(0.0)
    attention.merge()
    with pytest.raises(RuntimeError, match="is merged and cannot be trained"):
        attention.train()(X)
