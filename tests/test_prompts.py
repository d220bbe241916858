"""The prompt surgery against open_clip's own encoders and against a plain block-by-block loop."""

import pytest
import torch

from blocklora import prompts
from blocklora.clip import load_backbone
from blocklora.inject import apply_adapters
from tests.methods.reference import prompted_image, prompted_text


@pytest.fixture
def model(tiny_config, tiny_checkpoint):
    torch.manual_seed(0)
    return load_backbone(tiny_config, str(tiny_checkpoint)).model.eval()


@pytest.mark.parametrize("empty", [None, "zero-sized"])
def test_without_prompts_the_encoders_are_open_clips_own_exactly(model, tiny_config, empty):
    import open_clip

    images = torch.rand(3, 3, 32, 32)
    append = None if empty is None else torch.zeros(0, model.visual.conv1.out_channels)
    with torch.no_grad():
        assert torch.equal(
            prompts.encode_image(model, images, append=append, deep={}),
            model.encode_image(images, normalize=True),
        )
        tokens = open_clip.get_tokenizer(tiny_config)(["a photo of a red square.", "an image of blue."])
        embeddings = model.token_embedding(tokens)
        assert torch.equal(
            prompts.encode_text(model, embeddings, tokens, deep={}), model.encode_text(tokens, normalize=True)
        )


def test_without_prompts_adapted_encoders_are_unchanged_too(model):
    apply_adapters(model, "lora", rank=2, targets=("q", "v"), encoders=("vision", "text"), layers="all")
    with torch.no_grad():
        for adapter in model.modules():
            if hasattr(adapter, "B"):
                adapter.B.normal_()
        images = torch.rand(2, 3, 32, 32)
        assert torch.equal(prompts.encode_image(model, images), model.encode_image(images, normalize=True))


def test_appended_and_deep_vision_prompts_equal_a_plain_loop(model):
    width = model.visual.conv1.out_channels
    generator = torch.Generator().manual_seed(1)
    first = torch.randn(3, width, generator=generator)
    deep = {1: torch.randn(3, width, generator=generator)}  # the tiny model has blocks 0 and 1
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        got = prompts.encode_image(model, images, append=first, deep=deep, normalize=False)
        torch.testing.assert_close(got, prompted_image(model, images, first, deep))
        # at block 0, deep prompts replace the appended ones (after ln_pre) before any block sees them
        both = {0: deep[1], 1: first}
        got = prompts.encode_image(model, images, append=first, deep=both, normalize=False)
        torch.testing.assert_close(got, prompted_image(model, images, first, both))


def test_several_views_are_the_batch_once_per_set_of_prompts(model):
    width = model.visual.conv1.out_channels
    views = torch.randn(3, 2, width, generator=torch.Generator().manual_seed(2))
    images = torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        together = prompts.encode_image(model, images, append=views)
        assert together.shape == (3 * 5, model.visual.output_dim)
        for v in range(3):  # view-major
            torch.testing.assert_close(
                together[v * 5 : (v + 1) * 5], prompts.encode_image(model, images, append=views[v])
            )


def test_deep_text_prompts_replace_the_context_positions_and_keep_the_text_causal(model, tiny_config):
    import open_clip

    width = model.token_embedding.weight.shape[1]
    tokens = open_clip.get_tokenizer(tiny_config)(["X X a red square.", "X X a blue circle of light."])
    generator = torch.Generator().manual_seed(3)
    deep = {1: torch.randn(2, width, generator=generator)}
    with torch.no_grad():
        embeddings = model.token_embedding(tokens)
        embeddings[:, 1:3] = torch.randn(2, width, generator=generator)  # the input context
        full = prompts.encode_text(model, embeddings, tokens, deep=deep, normalize=False)
        torch.testing.assert_close(full, prompted_text(model, embeddings, tokens, deep))
        # positions after the end token never reach it: cut to the longest prompt, the same features
        length = int(tokens.argmax(dim=-1).max()) + 1
        cut = prompts.encode_text(
            model, embeddings[:, :length], tokens[:, :length], deep=deep, normalize=False
        )
        torch.testing.assert_close(cut, full, atol=1e-5, rtol=1e-5)


def test_misplaced_prompts_are_named(model):
    width = model.visual.conv1.out_channels
    images = torch.rand(1, 3, 32, 32)
    with pytest.raises(ValueError, match="deep vision prompts replace the appended ones: give `append` too"):
        prompts.encode_image(model, images, deep={1: torch.zeros(2, width)})
    with pytest.raises(ValueError, match=r"deep prompts for blocks \[5\], but the transformer has 2"):
        prompts.encode_image(model, images, append=torch.zeros(2, width), deep={5: torch.zeros(2, width)})
    with pytest.raises(ValueError, match="3 deep prompt tokens for 2 prompt positions"):
        prompts.encode_image(model, images, append=torch.zeros(2, width), deep={1: torch.zeros(3, width)})
    with pytest.raises(ValueError, match=r"appended prompts must be \(n, 64\) or \(views, n, 64\)"):
        prompts.encode_image(model, images, append=torch.zeros(2, 7))
