import pytest
import torch

from blocklora import load_backbone
from blocklora.clip import encode_text


def test_truncated_prompt_tokens_give_the_same_text_features(tiny_config, tiny_checkpoint):
    backbone = load_backbone(tiny_config, str(tiny_checkpoint))
    prompts = ["a photo of a cat.", "a centered satellite photo of Annual Crop Land.", "dog"]
    short = backbone.tokenize(prompts)
    full = backbone.tokenizer(prompts)
    assert short.shape[1] < full.shape[1] == 77
    with torch.no_grad():
        truncated = encode_text(backbone.model, short)
        reference = backbone.model.encode_text(full, normalize=True)
    assert (truncated - reference).abs().max() <= 1e-5


def test_local_checkpoint_is_loaded(tiny_config, tiny_checkpoint):
    a = load_backbone(tiny_config, str(tiny_checkpoint))
    b = load_backbone(tiny_config, str(tiny_checkpoint))
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert a.model.blocklora_backbone == {"name": tiny_config, "pretrained": "tiny.pt"}
    assert a.image_size == 32


def test_unknown_backbone_and_missing_weights_are_clear_errors(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'ViT-Q-99'"):
        load_backbone("ViT-Q-99")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_backbone(tiny_config, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="tags for ViT-B-16"):
        load_backbone("ViT-B-16", "not-a-tag")


def test_demo_config_ships_with_the_package():
    from blocklora.clip import CONFIG_DIR

    assert (CONFIG_DIR / "demo-tiny.json").is_file()
