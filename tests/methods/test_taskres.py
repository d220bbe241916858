import pytest
import torch

from tests.methods import reference as ref

TOY = {"epochs": 6, "log_every": 2}


def _reference_logits(method, model_name: str, images, templates: list[str]) -> torch.Tensor:
    """TaskRes's CustomCLIP.forward: base = mean over templates of unnormalized frozen text features,
    t' = base + α · residual, 100 · f̂ · t̂'ᵀ."""
    model = method.backbone.model
    names = method.task.classnames
    with torch.no_grad():
        per_template = [
            model.encode_text(ref.tokenize(model_name, [t.format(n) for n in names])) for t in templates
        ]
    base = torch.stack(per_template).mean(0)
    text = ref.normalized(base + method.hp["alpha"] * method.learner.residual)
    return 100.0 * ref.image_features(model, images) @ text.T


@pytest.mark.parametrize(
    ("dataset", "templates", "alpha"),
    [
        ("dtd", ["{} texture."], 0.5),
        ("oxford_flowers", ["a photo of a {}, a type of flower."], 1.0),
        ("imagenet", ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                      "a {} in a video game.", "art of the {}.", "a photo of the small {}.", "a photo of a {}."], 0.5),
    ],
)  # fmt: skip
def test_taskres_logits_add_alpha_times_the_residual_to_its_templates_features(
    make_method, tiny_config, dataset, templates, alpha
):
    method, _ = make_method("taskres", dataset=dataset)
    assert method.hp["alpha"] == alpha
    with torch.no_grad():
        method.learner.residual.normal_(generator=torch.Generator().manual_seed(0))
    images = torch.rand(3, 3, 32, 32)
    expected = _reference_logits(method, tiny_config, images, templates)
    with torch.no_grad():
        torch.testing.assert_close(method.train_logits(images), expected, atol=1e-4, rtol=1e-5)
        method.prepare_eval()
        features = ref.image_features(method.backbone.model, images)
        torch.testing.assert_close(method.eval_logits_from_features(features), expected, atol=1e-4, rtol=1e-5)


def test_taskres_recipe(make_method):
    for dataset, shots, lr, epochs in [("dtd", 1, 2e-3, 100), ("dtd", 4, 2e-3, 100), ("dtd", 8, 2e-3, 200),
                                       ("imagenet", 16, 2e-4, 200)]:  # fmt: skip
        method, _ = make_method("taskres", dataset=dataset, shots=shots)
        assert (method.hp["lr"], method.hp["epochs"]) == (lr, epochs)
    hp = method.hp
    assert (hp["optimizer"], hp["batch_size"], hp["weight_decay"], hp["warmup_epochs"]) == (
        "adam",
        256,
        5e-4,
        1,
    )
    assert torch.equal(method.learner.residual, torch.zeros(4, 32))  # starts as zero-shot CLIP


def test_taskres_trains_a_residual_per_class(run_method):
    record = run_method("taskres", TOY)
    assert record["trainable_params"] == 4 * 32  # classes × joint dim
    assert record["iterations"] == 6  # 48 images, batch 256: one step per epoch
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("taskres", {**TOY, "epochs": 2, "warmup_epochs": 0})
