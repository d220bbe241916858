import pytest
import torch
import torch.nn.functional as F

from blocklora.methods.prograd import project_gradient
from tests.methods import reference as ref

TOY = {"epochs": 4, "batch_size": 16, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 0.0, "log_every": 3}


def _official_projection(a_grad: torch.Tensor, b_grad: torch.Tensor, lambda_: float) -> torch.Tensor:
    """prograd_backward_and_update (Dassl.ProGrad.pytorch), for one parameter."""
    b_grad_norm = b_grad / torch.linalg.norm(b_grad)
    a_grad_norm = a_grad / torch.linalg.norm(a_grad)
    if torch.dot(a_grad_norm.flatten(), b_grad_norm.flatten()) < 0:
        return a_grad - lambda_ * torch.dot(a_grad.flatten(), b_grad_norm.flatten()) * b_grad_norm
    return a_grad


@pytest.mark.parametrize(
    ("ce", "kl", "conflict"),
    [([1.0, 0.0], [-1.0, 1.0], True), ([1.0, 1.0], [1.0, 0.0], False), ([1.0, 0.0], [0.0, 1.0], False)],
)
def test_the_cross_entropy_gradient_loses_only_its_part_against_the_teacher(ce, kl, conflict):
    ce, kl = torch.tensor([ce, ce]), torch.tensor([kl, kl])
    projected = project_gradient(ce, kl, 1.0)
    torch.testing.assert_close(projected, _official_projection(ce, kl, 1.0))
    assert (
        (float(torch.dot(projected.flatten(), kl.flatten())) >= -1e-7)
        if conflict
        else torch.equal(projected, ce)
    )
    torch.testing.assert_close(project_gradient(ce, kl, 0.8), _official_projection(ce, kl, 0.8))


def _reference_gradient(method, model_name: str, images, labels, template: str) -> torch.Tensor:
    """ProGrad's forward_backward: student and zero-shot teacher logits, CE and KL (T = 1) gradients of the
    context taken separately, then the projection."""
    model = method.backbone.model
    names = method.task.classnames
    ctx = method.context.ctx.detach().clone().requires_grad_(True)
    prefix_text = " ".join(["X"] * 8) + " " + template[: -len(" {}.")]
    tokens, embeddings = ref.prompt_embeddings(model, model_name, [f"{prefix_text} {n}." for n in names])
    text = ref.normalized(
        ref.text_encoder(model, ref.spliced(embeddings[:, :1], ctx, embeddings[:, 17:]), tokens)
    )
    with torch.no_grad():
        teacher_text = ref.normalized(
            model.encode_text(ref.tokenize(model_name, [template.format(n) for n in names]))
        )
    image = ref.image_features(model, images)
    student, teacher = 100.0 * image @ text.T, 100.0 * image @ teacher_text.T
    xe_loss = F.cross_entropy(student, labels)
    kl_loss = (-F.softmax(teacher, dim=-1) * F.log_softmax(student, -1)).sum(1).mean()
    (b_grad,) = torch.autograd.grad(kl_loss, ctx, retain_graph=True)
    (a_grad,) = torch.autograd.grad(xe_loss, ctx)
    return _official_projection(a_grad, b_grad, 1.0), torch.dot(a_grad.flatten(), b_grad.flatten())


@pytest.mark.parametrize("against_the_teacher", [True, False])
def test_prograd_steps_along_the_officially_projected_gradient(make_method, tiny_config, against_the_teacher):
    method, _ = make_method("prograd", dataset="oxford_pets", shots=4)
    images = torch.rand(6, 3, 32, 32)
    with torch.no_grad():
        teacher = ref.image_features(method.backbone.model, images) @ method.teacher_text.T
    # labels the teacher finds least likely pull the gradients apart; its own choices keep them together
    labels = teacher.argmin(dim=1) if against_the_teacher else teacher.argmax(dim=1)
    expected, agreement = _reference_gradient(
        method, tiny_config, images, labels, "a type of pet, a photo of a {}."
    )
    assert (float(agreement) < 0) == against_the_teacher
    params = method.trainable_parameters()
    method.backward(method.train_losses(images, labels), torch.amp.GradScaler("cpu", enabled=False), params)
    # float32 noise only (gradients of logits scaled by 100, the text cut to its longest prompt here)
    assert float((params[0].grad - expected).norm() / expected.norm()) < 1e-4


def test_the_context_starts_as_zeros_then_the_words_of_prograds_template(make_method, tiny_config):
    method, _ = make_method("prograd", dataset="oxford_pets")
    model = method.backbone.model
    # 8 words ("pet," is two tokens): 8 zeros, then the first 8 tokens; the 9th stays in the suffix
    _, words = ref.prompt_embeddings(model, tiny_config, ["a type of pet, a photo of a"])
    ctx = method.context.ctx
    assert ctx.shape == (16, 64) and torch.equal(ctx[:8], torch.zeros(8, 64))
    torch.testing.assert_close(ctx[8:], words[0, 1:9])
    assert method.prompt_template() == "X X X X X X X X a type of pet, a photo of a {}."
    torch.testing.assert_close(method.context()[:, 17], words[0, 9].expand(4, -1))  # "a" before the name


def test_lambda_is_0_8_at_8_and_16_shots_on_three_datasets(make_method):
    for dataset, shots, expected in [("dtd", 8, 0.8), ("eurosat", 16, 0.8), ("oxford_flowers", 16, 0.8),
                                     ("dtd", 4, 1.0), ("oxford_pets", 16, 1.0)]:  # fmt: skip
        method, _ = make_method("prograd", dataset=dataset, shots=shots)
        assert method.hp["lambda"] == expected, (dataset, shots)
    method, _ = make_method("prograd", dataset="imagenet", shots=16)
    assert method.hp["epochs"] == 50 and method.hp["n_ctx"] == 16 and method.hp["temperature"] == 1.0


def test_a_dataset_without_a_prograd_template_takes_its_own_or_the_generic_one(make_method):
    method, _ = make_method("prograd")  # the toy task's template is "a photo of a {}."
    assert method.prompt_template() == " ".join(["X"] * 12) + " a photo of a {}."


def test_prograd_trains(run_method):
    record = run_method("prograd", TOY)
    assert record["trainable_params"] == 16 * 64
    assert record["train_stats"]["loss_last"] < record["train_stats"]["loss_first"]
    assert record["accuracy"] > 0.25


def test_state_round_trip_reproduces_the_logits(assert_round_trip):
    assert_round_trip("prograd", {**TOY, "epochs": 1})
