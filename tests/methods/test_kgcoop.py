import torch
import torch.nn.functional as F

from tests.methods import reference as ref

TOY = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "log_every": 3}


def _reference_losses(method, model_name: str, images, labels, texture_template: str) -> tuple:
    """KgCoOp's CustomCLIP.forward and forward_backward: CE + W · (1 − mean cos(t, t_clip)), t_clip from
    a fresh frozen CLIP's text features of KgCoOp's template."""
    model = method.backbone.model
    names = method.task.classnames
    tokens, embeddings = ref.prompt_embeddings(model, model_name, [f"a photo of a {n}." for n in names])
    text = ref.normalized(
        ref.text_encoder(model, ref.spliced(embeddings[:, :1], method.context.ctx, embeddings[:, 5:]), tokens)
    )
    with torch.no_grad():
        frozen = ref.normalized(
            model.encode_text(ref.tokenize(model_name, [texture_template.format(n) for n in names]))
        )
    logits = 100.0 * ref.image_features(model, images) @ text.T
    score = 1.0 - torch.nn.CosineSimilarity(dim=1, eps=1e-07)(text, frozen).mean()
    return F.cross_entropy(logits, labels) + 8.0 * score, score


def test_kgcoop_loss_equals_the_reference_with_its_own_template(make_method, tiny_config):
    method, _ = make_method("kgcoop", dataset="dtd")  # KgCoOp's DTD template, not CoOp's "{} texture."
    with torch.no_grad():
        method.context.ctx.add_(
            torch.randn(method.context.ctx.shape, generator=torch.Generator().manual_seed(0))
        )
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    losses = method.train_losses(images, labels)
    expected, score = _reference_losses(
        method, tiny_config, images, labels, "a photo of a {}, a type of texture."
    )
    torch.testing.assert_close(losses["kg"], score, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(losses["loss"], expected, atol=1e-5, rtol=1e-5)
    assert method.hp["kg_weight"] == 8.0 and float(losses["kg"].detach()) > 1e-3


def test_the_knowledge_term_is_zero_while_the_prompt_is_its_template(make_method):
    """At the start the context is "a photo of a", which is KgCoOp's ImageNet template itself."""
    method, _ = make_method("kgcoop", dataset="imagenet")
    with torch.no_grad():
        assert float(method.knowledge_term(method.class_features())) < 1e-6


def test_kgcoop_recipe(make_method):
    method, _ = make_method("kgcoop", shots=1)
    hp = method.hp
    assert (hp["n_ctx"], hp["ctx_init"], hp["epochs"], hp["batch_size"], hp["lr"]) == (
        4,
        "a photo of a",
        100,
        32,
        0.002,
    )


def test_kgcoop_trains_and_stays_near_zero_shot(run_method):
    record = run_method("kgcoop", TOY)
    assert record["trainable_params"] == 4 * 64
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]
    assert record["accuracy"] > 0.25


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("kgcoop", {**TOY, "epochs": 1})
