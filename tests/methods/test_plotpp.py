import pytest
import torch
import torch.nn.functional as F

from blocklora.methods.plotpp import PLOT_TEMPLATES, sinkhorn
from tests.methods import reference as ref

TOY = {"epochs": 3, "batch_size": 16, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "log_every": 3}


def _official_sinkhorn(K, u, v, max_iter=100, thresh=1e-2):
    """CustomCLIP.Sinkhorn of plot-pp/trainers/plotpp.py."""
    r = torch.ones_like(u)
    c = torch.ones_like(v)
    for _ in range(max_iter):
        r0 = r
        r = u / torch.matmul(K, c.unsqueeze(-1)).squeeze(-1)
        c = v / torch.matmul(K.permute(0, 2, 1).contiguous(), r.unsqueeze(-1)).squeeze(-1)
        err = (r - r0).abs().mean()
        if err.item() < thresh:
            break
    return torch.matmul(r.unsqueeze(-1), c.unsqueeze(-2)) * K


def test_sinkhorn_is_plots():
    sim = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1
    K = torch.exp(-(1 - sim) / 0.1)
    expected = _official_sinkhorn(K, torch.full((6, 4), 0.25), torch.full((6, 4), 0.25))
    torch.testing.assert_close(sinkhorn(K, 100, 1e-2), expected)
    plan = sinkhorn(torch.exp(-(1 - sim.abs() * 0.3) / 0.1), 1000, 1e-9)  # converged: both marginals uniform
    torch.testing.assert_close(plan.sum(-1), torch.full((6, 4), 0.25))
    torch.testing.assert_close(plan.sum(-2), torch.full((6, 4), 0.25))


def _reference_logits(method, model_name, images, stage):
    """PLOT++'s CustomCLIP.forward: M prompted views of each image, N prompted texts per class, the
    transport between them; stage 1 adds the pooled logits (TRADE_OFF)."""
    model, names = method.backbone.model, method.task.classnames
    templates = method.templates()
    texts = []
    for i, words in enumerate(templates):
        tokens, embeddings = ref.prompt_embeddings(model, model_name, [f"{words} {n}." for n in names])
        ctx = method.learner["contexts"][i].ctx
        texts.append(
            ref.text_encoder(
                model, ref.spliced(embeddings[:, :1], ctx, embeddings[:, 1 + ctx.shape[0] :]), tokens
            )
        )
    text = torch.stack(texts)  # N c d
    image = torch.stack(
        [ref.prompted_image(model, images, view, {}) for view in method.learner.vision]
    )  # M b d
    M, b, N, c = image.shape[0], image.shape[1], text.shape[0], text.shape[1]
    sim = torch.einsum("mbd,ncd->mnbc", F.normalize(image, dim=2), F.normalize(text, dim=2))
    sim = sim.reshape(M, N, b * c).permute(2, 0, 1)
    T = _official_sinkhorn(
        torch.exp(-(1.0 - sim) / 0.1), torch.full((b * c, M), 1 / M), torch.full((b * c, N), 1 / N)
    )
    logits = 100.0 * torch.sum(T * sim, dim=(1, 2)).view(b, c)
    if stage == "vision":
        pooled = F.normalize(image.mean(dim=0), dim=1) @ F.normalize(text.mean(dim=0), dim=1).t()
        logits = logits + 100.0 * pooled
    return logits


@pytest.mark.parametrize("stage", ["vision", "joint"])
def test_plotpp_logits_equal_the_reference_in_each_stage(make_method, tiny_config, stage):
    method, _ = make_method("plotpp", dataset="eurosat")
    ref.perturbed(method)
    method.stage = stage
    images = torch.rand(3, 3, 32, 32)
    expected = _reference_logits(method, tiny_config, images, stage)
    with torch.no_grad():
        torch.testing.assert_close(method.train_logits(images), expected, atol=1e-4, rtol=1e-5)


def test_the_text_prompts_start_from_the_datasets_four_templates(make_method, tiny_config):
    method, _ = make_method("plotpp", dataset="imagenet")
    assert method.templates() == PLOT_TEMPLATES["imagenet"]
    contexts = method.learner["contexts"]
    assert [c.ctx.shape for c in contexts] == [(4, 64)] * 4  # n_ctx: the first template's 4 words
    _, third = ref.prompt_embeddings(method.backbone.model, tiny_config, ["this is a"])
    # "this is a" has 3 words for 4 vectors: the 4th starts as the end token's embedding, as in their code
    torch.testing.assert_close(contexts[2].ctx, third[0, 1:5])
    eurosat, _ = make_method("plotpp", dataset="eurosat")
    assert eurosat.learner["contexts"][0].ctx.shape == (5, 64)


def test_each_run_trains_its_own_stage_one_then_both_prompts(make_method, monkeypatch):
    from blocklora import train

    stages = []
    original = train.TrainStep.__init__

    def spy(self, method, *args):
        original(self, method, *args)
        stages.append((method.stage, {id(p) for p in self.params}))

    monkeypatch.setattr(train.TrainStep, "__init__", spy)
    method, run = make_method("plotpp", TOY)
    contexts = [c.ctx.detach().clone() for c in method.learner["contexts"]]
    stats = method.fit(run)
    vision = {id(method.learner.vision)}
    assert stages[0] == ("vision", vision)  # stage 1: the image prompts alone
    assert stages[1][0] == "joint" and stages[1][1] == {id(p) for p in method.learner.parameters()}
    assert stats["iterations"] == 2 * 3 * 3 and stats["stage1"]["iterations"] == 9
    assert any(
        not torch.equal(c.ctx, before) for c, before in zip(method.learner["contexts"], contexts, strict=True)
    )
    assert all(p.requires_grad for p in method.learner.parameters())


def test_plotpp_trains(run_method):
    record = run_method("plotpp", TOY)
    assert record["trainable_params"] == 4 * 4 * 64 + 4 * 2 * 64  # N·n_ctx·width + M·2·vision width
    assert record["iterations"] == 2 * 3 * 3
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]
