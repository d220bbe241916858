import torch

from tests.methods import reference as ref

TOY = {
    "depth": 2,
    "epochs": 3,
    "batch_size": 16,
    "optimizer": "adamw",
    "lr": 1e-2,
    "weight_decay": 0.0,
    "log_every": 3,
}


def _reference_logits(method, model_name, images):
    """MaPLe's CustomCLIP.forward with its MultiModalPromptLearner: text [SOS] ctx "of a" name . with the
    compound text prompts at blocks 1…; the image with proj(ctx) appended and coupling_i(text prompt i)
    at blocks 1…"""
    model = method.backbone.model
    tokens, embeddings = ref.prompt_embeddings(
        model, model_name, [f"a photo of a {n}." for n in method.task.classnames]
    )
    ctx = method.learner["context"].ctx
    prompts = ref.spliced(embeddings[:, :1], ctx, embeddings[:, 1 + 2 :])
    text_deep = {i + 1: p for i, p in enumerate(method.learner["deep_text"])}
    vision_deep = {
        i + 1: layer(p)
        for i, (layer, p) in enumerate(
            zip(method.learner["couplings"], method.learner["deep_text"], strict=True)
        )
    }
    text = ref.normalized(ref.prompted_text(model, prompts, tokens, text_deep))
    image = ref.normalized(ref.prompted_image(model, images, method.learner["proj"](ctx), vision_deep))
    return 100.0 * image @ text.T


def test_maple_logits_equal_the_reference(make_method, tiny_config):
    method, _ = make_method("maple", {"depth": 2})
    ref.perturbed(method)
    images = torch.rand(3, 3, 32, 32)
    expected = _reference_logits(method, tiny_config, images)
    with torch.no_grad():
        torch.testing.assert_close(method.train_logits(images), expected, atol=1e-4, rtol=1e-5)
        method.prepare_eval()
        torch.testing.assert_close(method.eval_logits(images), expected, atol=1e-4, rtol=1e-5)


def test_the_image_prompts_are_the_coupling_functions_of_the_text_prompts(make_method, tiny_config):
    method, _ = make_method("maple", {"depth": 2})
    ref.perturbed(method)
    learner = method.learner
    ctx, deep_text = learner["context"].ctx, learner["deep_text"]
    proj, coupling = learner["proj"], learner["couplings"][0]
    torch.testing.assert_close(method.vision_append(), ctx @ proj.weight.T + proj.bias)
    torch.testing.assert_close(method.vision_deep()[1], deep_text[0] @ coupling.weight.T + coupling.bias)
    assert set(method.text_deep()) == set(method.vision_deep()) == {1}
    # the context starts as the first two tokens of "a photo of a"; the words after them stay
    fresh, _ = make_method("maple", {"depth": 2})
    _, words = ref.prompt_embeddings(fresh.backbone.model, tiny_config, ["a photo of a"])
    torch.testing.assert_close(fresh.learner["context"].ctx, words[0, 1:3])
    assert fresh.prompt_template() == "a photo of a {}."


def test_the_couplings_start_as_copies_of_one_layer_and_everything_learns(make_method):
    method, _ = make_method("maple", {"depth": 2})
    assert method.hp["lr"] == 0.0035 and method.hp["batch_size"] == 4 and method.hp["epochs"] == 5
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    method.train_losses(images, labels)["loss"].backward()
    for name, param in method.learner.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_maple_trains(run_method):
    record = run_method("maple", TOY)
    # ctx 2×64, proj and one coupling 64→64 with biases, one deeper pair of text tokens
    assert record["trainable_params"] == 2 * 64 + 2 * (64 * 64 + 64) + 2 * 64
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]


def test_the_prompt_depth_must_fit_the_backbone(make_method):
    import pytest

    with pytest.raises(
        ValueError, match="prompt depth 9 of the text encoder must be between 1 and its 2 blocks"
    ):
        make_method("maple")
