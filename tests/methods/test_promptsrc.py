import pytest
import scipy.stats
import torch

from blocklora.methods.promptsrc import TEACHER_TEMPLATES
from tests.methods import reference as ref

SMALL = {"depth_text": 2, "depth_vision": 2}
TOY = {
    **SMALL,
    "epochs": 3,
    "batch_size": 16,
    "optimizer": "adamw",
    "lr": 1e-2,
    "weight_decay": 0.0,
    "log_every": 3,
}


def _reference(method, model_name, images, labels):
    """PromptSRC's CustomCLIP.forward and forward_backward, written out again."""
    model, names = method.backbone.model, method.task.classnames
    tokens, embeddings = ref.prompt_embeddings(model, model_name, [f"a photo of a {n}." for n in names])
    learner = method.learner
    prompts = ref.spliced(embeddings[:, :1], learner["context"].ctx, embeddings[:, 5:])
    text = ref.normalized(ref.prompted_text(model, prompts, tokens, {1: learner["deep_text"][0]}))
    image = ref.normalized(
        ref.prompted_image(model, images, learner.first_vision, {1: learner["deep_vision"][0]})
    )
    logits = 100.0 * image @ text.T
    with (
        torch.no_grad()
    ):  # the teacher: 60 templates' mean of unnormalized features, and the unprompted image
        per_template = [
            model.encode_text(ref.tokenize(model_name, [t.format(n) for n in names]))
            for t in TEACHER_TEMPLATES
        ]
        fixed = ref.normalized(torch.stack(per_template, dim=1).mean(dim=1))
        zero_shot = ref.normalized(model.encode_image(images))
        zero_shot_logits = 100.0 * zero_shot @ fixed.T
    p_log, q_log = torch.log_softmax(logits, 1), torch.log_softmax(zero_shot_logits, 1)
    return {
        "logits": logits,
        "ce": ref.cross_entropy(logits, labels),
        "text": (text - fixed).abs().mean() * 25,
        "image": (image - zero_shot).abs().mean() * 10,
        "kl": (q_log.exp() * (q_log - p_log)).sum() / logits.numel(),
    }


def test_promptsrc_logits_and_its_three_consistency_losses_equal_the_reference(make_method, tiny_config):
    method, _ = make_method("promptsrc", SMALL)
    ref.perturbed(method)
    assert len(TEACHER_TEMPLATES) == 60
    images, labels = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    expected = _reference(method, tiny_config, images, labels)
    losses = method.train_losses(images, labels)
    for name in ("ce", "text", "image", "kl"):
        torch.testing.assert_close(losses[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)
    torch.testing.assert_close(
        losses["loss"], sum(expected[k] for k in ("ce", "text", "image", "kl")), atol=1e-5, rtol=1e-4
    )
    with torch.no_grad():
        method.prepare_eval()
        torch.testing.assert_close(method.eval_logits(images), expected["logits"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize(
    ("dataset", "mean", "std"), [("imagenet", 30, 30), ("sun397", 30, 30), ("dtd", 45, 5), ("eurosat", 45, 5)]
)
def test_gaussian_prompt_aggregation_weighs_each_epochs_prompts(make_method, dataset, mean, std):
    method, _ = make_method("promptsrc", SMALL, dataset=dataset)
    assert (method.hp["gpa_mean"], method.hp["gpa_std"]) == (mean, std)
    epochs = 50
    density = scipy.stats.norm(mean, std).pdf(range(1, epochs + 1))
    weights = density / density.sum()
    snapshots = []
    generator = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        with torch.no_grad():
            for param in method.learner.parameters():
                param.copy_(torch.randn(param.shape, generator=generator))
        snapshots.append({k: v.detach().clone() for k, v in method.learner.named_parameters()})
        method.epoch_end(epoch, epochs)
    for name, param in method.learner.named_parameters():
        expected = sum(float(w) * snap[name] for w, snap in zip(weights, snapshots, strict=True))
        torch.testing.assert_close(param.detach(), expected, atol=1e-5, rtol=1e-5)


def test_the_loop_aggregates_after_every_epoch_and_a_resumed_run_keeps_the_sum(make_method, monkeypatch):
    from blocklora.methods.promptsrc import PromptSRC

    seen = []
    original = PromptSRC.epoch_end

    def spy(self, epoch, epochs):
        seen.append((epoch, epochs))
        original(self, epoch, epochs)

    monkeypatch.setattr(PromptSRC, "epoch_end", spy)
    method, run = make_method("promptsrc", TOY)
    method.fit(run)
    assert seen == [(0, 3), (1, 3), (2, 3)]
    state = method.loop_state()
    other, _ = make_method("promptsrc", TOY)
    other.load_loop_state(state)
    for name, total in other.gpa.items():
        torch.testing.assert_close(total, state[f"gpa.{name}"])


def test_promptsrc_trains(run_method):
    record = run_method("promptsrc", TOY)
    assert record["trainable_params"] == 4 * 64 * 2 + 4 * 64 * 2  # text and image, the input and block 1
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]
    hp = record["hparams"]
    assert (hp["text_weight"], hp["image_weight"], hp["kl_weight"]) == (25.0, 10.0, 1.0)
