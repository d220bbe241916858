import pytest
import torch

from tests.methods import reference as ref

TOY = {"epochs": 2, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "log_every": 12}


def _reference_logits(method, model_name: str, images: torch.Tensor) -> torch.Tensor:
    """CoCoOp's CustomCLIP.forward: per image, the meta-net's bias on every context vector, all classes'
    prompts through the text encoder, 100 · f̂ · t̂ᵀ."""
    model = method.backbone.model
    texts = [f"a photo of a {name}." for name in method.task.classnames]
    tokens, embeddings = ref.prompt_embeddings(model, model_name, texts)
    prefix, suffix = embeddings[:, :1], embeddings[:, 1 + 4 :]
    ctx = method.context.ctx
    net = method.meta_net
    logits = []
    for feature in ref.image_features(model, images):
        bias = net.linear2(torch.relu(net.linear1(feature)))  # (width,)
        text = ref.normalized(ref.text_encoder(model, ref.spliced(prefix, ctx + bias, suffix), tokens))
        logits.append(100.0 * feature @ text.T)
    return torch.stack(logits)


def test_cocoop_logits_equal_the_reference_in_training_and_at_test_time(make_method, tiny_config):
    method, _ = make_method("cocoop")
    ref.perturbed(method)
    images = torch.rand(3, 3, 32, 32)
    expected = _reference_logits(method, tiny_config, images)
    with torch.no_grad():
        torch.testing.assert_close(method.train_logits(images), expected, atol=2e-5, rtol=1e-5)
        method.prepare_eval()
        features = ref.image_features(method.backbone.model, images)
        method.hp["text_batch"] = 5  # one image per chunk of 4 prompts
        torch.testing.assert_close(method.eval_logits_from_features(features), expected, atol=2e-5, rtol=1e-5)


def test_the_meta_nets_bias_shifts_every_context_token_of_each_image(make_method, tiny_config):
    method, _ = make_method("cocoop")
    ref.perturbed(method)
    model, ctx = method.backbone.model, method.context.ctx
    features = ref.image_features(model, torch.rand(2, 3, 32, 32))
    with torch.no_grad():
        bias = method.meta_net(features)
        prompts = method.context(shift=bias)  # (images, classes, length, width)
    texts = [f"a photo of a {name}." for name in method.task.classnames]
    _, embeddings = ref.prompt_embeddings(model, tiny_config, texts)
    length = prompts.shape[2]
    for i in range(2):
        for c in range(len(texts)):
            torch.testing.assert_close(prompts[i, c, 1:5], ctx + bias[i])  # every one of the 4 tokens
            torch.testing.assert_close(prompts[i, c, :1], embeddings[c, :1])
            torch.testing.assert_close(prompts[i, c, 5:], embeddings[c, 5:length])
    assert (prompts[0, :, 1:5] - prompts[1, :, 1:5]).abs().max() > 1e-4  # each image its own prompts


def test_the_context_starts_as_a_photo_of_a_and_the_meta_net_is_ds_sixteenth(make_method, tiny_config):
    method, _ = make_method("cocoop")
    model = method.backbone.model
    _, embeddings = ref.prompt_embeddings(model, tiny_config, ["a photo of a"])
    torch.testing.assert_close(method.context.ctx, embeddings[0, 1:5])
    dim, width = model.visual.output_dim, method.context.ctx.shape[1]
    assert method.meta_net.linear1.weight.shape == (dim // 16, dim)
    assert method.meta_net.linear2.weight.shape == (width, dim // 16)
    hp = method.hp
    assert (hp["batch_size"], hp["epochs"], hp["lr"], hp["optimizer"], hp["n_ctx"]) == (
        1,
        10,
        0.002,
        "sgd",
        4,
    )


def test_cocoop_trains_one_image_a_step_and_learns(run_method):
    record = run_method("cocoop", TOY)
    assert record["iterations"] == 2 * 48  # batch 1: an epoch is one step per image (4 classes × 12 shots)
    assert record["trainable_params"] == 4 * 64 + (32 * 2 + 2) + (2 * 64 + 64)
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]
    assert record["accuracy"] > 0.25


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("cocoop", {**TOY, "epochs": 1})


@pytest.mark.parametrize("classes_per_chunk", [1, 3, 100])
def test_evaluation_chunks_change_nothing(make_method, classes_per_chunk):
    method, _ = make_method("cocoop")
    ref.perturbed(method)
    method.prepare_eval()
    features = ref.image_features(method.backbone.model, torch.rand(5, 3, 32, 32))
    whole = method.eval_logits_from_features(features)
    method.hp["text_batch"] = classes_per_chunk * 4
    torch.testing.assert_close(method.eval_logits_from_features(features), whole)


def test_only_the_classes_that_compete_are_encoded_at_test_time(make_method):
    method, _ = make_method("cocoop")
    ref.perturbed(method)
    features = ref.image_features(method.backbone.model, torch.rand(3, 3, 32, 32))
    method.prepare_eval()
    whole = method.eval_logits_from_features(features)
    method.eval_classes([1, 3])  # as for ImageNet-A/-R's 200 classes
    method.prepare_eval()
    restricted = method.eval_logits_from_features(features)
    torch.testing.assert_close(restricted[:, [1, 3]], whole[:, [1, 3]])
    assert torch.isneginf(restricted[:, [0, 2]]).all()
