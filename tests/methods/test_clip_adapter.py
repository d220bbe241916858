import torch
import torch.nn.functional as F

from blocklora.methods import get_method

# the tiny random backbone's text classifier is at chance: let the adapter carry more of the feature
TOY = {"ratio": 0.6, "lr": 1e-2, "epochs": 100, "augment_passes": 3}


def test_clip_adapter_trains_a_bottleneck_and_beats_chance(run_method):
    record = run_method("clip_adapter", TOY)
    assert record["trainable_params"] == 2 * 32 * 32 // 4  # dim → dim/4 → dim, no biases
    assert record["iterations"] == 100 * 2  # 48 images, batch 32
    stats = record["train_stats"]
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert record["accuracy"] >= 0.75


def test_defaults_document_the_protocol():
    hp = get_method("clip_adapter").all_defaults()
    assert (hp["reduction"], hp["ratio"], hp["logit_scale"]) == (4, 0.2, 100.0)
    assert (hp["optimizer"], hp["lr"], hp["batch_size"], hp["epochs"]) == ("adamw", 1e-3, 32, 200)


def test_the_adapter_ignores_the_scale_of_the_feature(make_method):
    method, _ = make_method("clip_adapter")
    method.classifier = method.text_features().float()
    torch.nn.init.normal_(method.adapter.fc[0].weight)
    torch.nn.init.normal_(method.adapter.fc[2].weight)
    features = F.normalize(torch.randn(5, 32), dim=-1)
    with torch.no_grad():
        torch.testing.assert_close(method.logits(3.7 * features), method.logits(features))


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("clip_adapter", {**TOY, "epochs": 5})
