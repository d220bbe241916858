import pytest
import torch
from torch import nn

from blocklora.adapters import BlockLoRALinear, LoRALinear, LowRankAdapter, adapter_parameter_count, chunk_sum


def _randomize(adapter: LowRankAdapter) -> None:
    with torch.no_grad():
        adapter.lora_B.normal_()


def test_blocks_one_is_exactly_lora():
    torch.manual_seed(0)
    base = nn.Linear(24, 16)
    lora = LoRALinear(base, rank=3, alpha=2.0)
    block = BlockLoRALinear(base, rank=3, alpha=2.0, blocks=1)
    block.adapter.load_state_dict(lora.adapter.state_dict())
    _randomize(lora.adapter)
    block.adapter.lora_B.data.copy_(lora.adapter.lora_B)
    x = torch.randn(5, 24)
    torch.testing.assert_close(block(x), lora(x), rtol=0, atol=0)


@pytest.mark.parametrize("blocks", [1, 2, 4, 8])
def test_chunk_sum_forward_equals_explicit_block_matrix(blocks):
    torch.manual_seed(blocks)
    base = nn.Linear(64, 48)
    layer = BlockLoRALinear(base, rank=2, alpha=1.0, blocks=blocks)
    _randomize(layer.adapter)
    a_s, b = layer.adapter.lora_A.detach(), layer.adapter.lora_B.detach()
    explicit = torch.cat([a_s] * blocks, dim=1)  # [A_s | A_s | ... | A_s], rank x d_in
    delta_w = layer.adapter.scaling * b @ explicit
    x = torch.randn(3, 7, 64)
    expected = base(x) + x @ delta_w.T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), delta_w)


def test_chunk_sum_sums_equal_chunks():
    x = torch.arange(8.0).view(1, 8)
    torch.testing.assert_close(chunk_sum(x, 4), torch.tensor([[0.0 + 2 + 4 + 6, 1.0 + 3 + 5 + 7]]))


def test_zero_initialized_adapter_is_the_identity():
    base = nn.Linear(32, 32)
    layer = BlockLoRALinear(base, blocks=4, dropout=0.25)
    layer.train()
    x = torch.randn(4, 32)
    torch.testing.assert_close(layer(x), base(x))
    assert torch.count_nonzero(layer.adapter.lora_A) > 0


def test_merge_then_unmerge_restores_weights_and_outputs():
    torch.manual_seed(1)
    base = nn.Linear(32, 16)
    original = base.weight.detach().clone()
    layer = BlockLoRALinear(base, rank=2, blocks=4)
    _randomize(layer.adapter)
    layer.eval()
    x = torch.randn(6, 32)
    before = layer(x)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(base.weight, original, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_training_a_merged_layer_is_refused():
    layer = LoRALinear(nn.Linear(8, 8))
    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="merged"):
        layer(torch.randn(2, 8))
    with torch.no_grad():
        layer(torch.randn(2, 8))  # inference in train mode without gradients is fine


def test_blocks_not_dividing_the_width_is_an_error_naming_layer_and_width():
    with pytest.raises(ValueError, match=r"visual\.q.*blocks=5.*width 768"):
        LowRankAdapter(768, 768, blocks=5, name="visual.q")


def test_dropout_applies_to_the_adapter_input_only():
    torch.manual_seed(2)
    base = nn.Linear(16, 16)
    layer = LoRALinear(base, dropout=0.5)
    layer.train()
    x = torch.randn(64, 16)
    torch.testing.assert_close(layer(x), base(x))  # B = 0: dropout never reaches the frozen path


def test_scaling_choices():
    assert LowRankAdapter(8, 8, rank=4, alpha=2.0).scaling == pytest.approx(1.0)
    assert LowRankAdapter(8, 8, rank=4, alpha=2.0, scaling="linear").scaling == pytest.approx(0.5)
    with pytest.raises(ValueError, match="scaling"):
        LowRankAdapter(8, 8, scaling="cube")


def test_parameter_count_formula():
    adapter = LowRankAdapter(768, 768, rank=2, blocks=8)
    assert (
        sum(p.numel() for p in adapter.parameters())
        == adapter_parameter_count(768, 768, 2, 8)
        == 2 * (96 + 768)
    )


def test_matched_init_gives_a_x_the_spread_of_loras_and_kaiming_sqrt_n_times_it():
    torch.manual_seed(0)
    x = torch.randn(20_000, 768)

    def spread(blocks: int, init: str) -> float:
        return LowRankAdapter(768, 768, rank=2, blocks=blocks, init=init).down(x).std().item()

    lora = sum(spread(1, "kaiming") for _ in range(20)) / 20
    kaiming = sum(spread(8, "kaiming") for _ in range(20)) / 20
    matched = sum(spread(8, "matched") for _ in range(20)) / 20
    assert kaiming / lora == pytest.approx(8**0.5, rel=0.15)
    assert matched / lora == pytest.approx(1.0, rel=0.15)
    assert spread(1, "matched") == pytest.approx(spread(1, "kaiming"), rel=0.3)  # one block: the same law
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        LowRankAdapter(8, 8, init="xavier")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "rank must be >= 1, got 0"),
        ({"blocks": 0}, "blocks=0 does not divide its input width 8"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\), got -0.1"),
        ({"init": "xavier"}, "unknown init 'xavier'"),
    ],
)
def test_bad_adapter_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=f"adapter: {message}"):
        LowRankAdapter(8, 4, **kwargs)


def test_the_smallest_good_settings_are_accepted():
    adapter = LowRankAdapter(8, 4, rank=1, blocks=8, dropout=0.99)
    assert adapter.lora_A.shape == (1, 1) and adapter.lora_B.shape == (4, 1)


def test_default_adapter_is_rank_2_lora_scaled_by_alpha_over_sqrt_r():
    adapter = LowRankAdapter(8, 4)
    assert (adapter.rank, adapter.blocks) == (2, 1)
    assert adapter.scaling == pytest.approx(1 / 2**0.5)
    assert BlockLoRALinear(nn.Linear(16, 4)).adapter.blocks == 8


@pytest.mark.parametrize("blocks", [1, 4])
def test_a_is_drawn_as_nn_linear_draws_a_weight_of_its_shape(blocks):
    """kaiming-uniform with a = sqrt(5) on rank x d/n: uniform on +-1/sqrt(d/n)."""
    torch.manual_seed(0)
    adapter = LowRankAdapter(256, 4, rank=64, blocks=blocks)
    bound = 1 / (256 // blocks) ** 0.5
    assert adapter.lora_A.abs().max() <= bound
    assert adapter.lora_A.abs().max() > 0.97 * bound


def test_layers_freeze_their_base_and_name_themselves_in_errors():
    layer = LoRALinear(nn.Linear(8, 4))
    assert not any(p.requires_grad for p in layer.base.parameters())
    assert (layer.in_features, layer.out_features) == (8, 4)
    with pytest.raises(TypeError, match=r"layer: expected nn\.Linear, got Conv1d"):
        LoRALinear(nn.Conv1d(8, 4, 1))
    with pytest.raises(RuntimeError, match="LoRALinear is not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="LoRALinear is already merged"):
        layer.merge()
    with pytest.raises(RuntimeError, match="LoRALinear is merged and cannot be trained"):
        layer.train()(torch.randn(2, 8))


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        LowRankAdapter(8, 4, 2)
    with pytest.raises(TypeError):
        LoRALinear(nn.Linear(8, 4), "q")
    with pytest.raises(TypeError):
        BlockLoRALinear(nn.Linear(8, 4), 4)


def test_the_parameter_count_is_an_integer_and_lora_by_default():
    assert adapter_parameter_count(64, 32, 2) == 2 * (64 + 32)
    count = adapter_parameter_count(64, 32, 2, blocks=8)
    assert type(count) is int and count == 2 * (8 + 32)
