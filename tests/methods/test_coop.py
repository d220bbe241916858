import pytest
import torch

from blocklora.methods import get_method

# the tiny random backbone needs a faster optimizer than CoOp's SGD to learn in a few steps
TOY = {"epochs": 12, "batch_size": 16, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "log_every": 6}


def test_coop_trains_its_context_and_beats_chance(run_method):
    record = run_method("coop", TOY)
    assert record["trainable_params"] == 16 * 64  # 16 context vectors of the text width
    assert record["iterations"] == 12 * (48 // 16)
    stats = record["train_stats"]
    assert stats["epochs"] == 12 and stats["warmup_iterations"] == 3 and stats["schedule"] == "dassl"
    assert stats["loss_last"] < stats["loss_first"]
    assert record["accuracy"] >= 0.75  # 4 classes: chance is 0.25


def test_defaults_are_coops():
    hp = get_method("coop").all_defaults()
    assert (hp["optimizer"], hp["lr"], hp["momentum"], hp["weight_decay"]) == ("sgd", 0.002, 0.9, 5e-4)
    assert (hp["batch_size"], hp["n_ctx"], hp["ctx_std"], hp["warmup_lr"]) == (32, 16, 0.02, 1e-5)
    assert (hp["warmup_epochs"], hp["eta_min"], hp["ctx_init"]) == (1, 0.0, None)
    assert not {"iterations_per_shot", "iterations", "warmup_iterations"} & set(hp)


@pytest.mark.parametrize(
    ("shots", "dataset", "epochs"),
    [
        (1, "toy", 50),
        (2, "toy", 100),
        (4, "toy", 100),
        (8, "toy", 200),
        (12, "toy", 200),
        (16, "toy", 200),
        (1, "imagenet", 50),
        (16, "imagenet", 50),
    ],
)
def test_coops_epochs_per_shot_count_and_on_imagenet(make_method, shots, dataset, epochs):
    method, _ = make_method("coop", shots=shots, dataset=dataset)
    assert method.hp["epochs"] == epochs
    schedule = method.schedule()
    assert schedule.epochs == epochs and schedule.steps_per_epoch == 48 // 32  # the toy task: 48 images
    assert method.iterations() == epochs * (48 // 32) and schedule.warmup_steps == 48 // 32


def test_explicit_epochs_override_the_table(make_method):
    method, _ = make_method("coop", {"epochs": 3, "batch_size": 10, "warmup_epochs": 2}, shots=1)
    assert method.iterations() == 3 * 4 and method.schedule().warmup_steps == 2 * 4


def test_context_sits_between_the_start_token_and_the_class_name(make_method):
    method, _ = make_method("coop")
    assert method.tokens.shape[0] == 4
    x_token = method.tokens[0, 1]
    assert (method.tokens[:, 1:17] == x_token).all()
    with torch.no_grad():
        method.context.ctx.copy_(method.model.token_embedding(x_token).expand(16, -1))
        spliced = method.class_features()
    prompts = [" ".join(["X"] * 16) + f" {name}." for name in method.task.classnames]
    torch.testing.assert_close(spliced, method.backbone.encode_text(prompts))


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("coop", {**TOY, "epochs": 1})
