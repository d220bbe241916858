"""What only a GPU shows: the CUDA paths agree with the CPU ones and a run trains under fp16.

Skipped without a GPU; ``benchmarks/gpu_check.sh`` runs them (``pytest -m cuda``) on a GPU machine.
"""

import json

import pytest
import torch

from blocklora import apply_adapters, load_backbone, merge_adapters
from blocklora.data.eval_images import eval_images
from blocklora.data.loading import DeviceAugment
from blocklora.inject import adapted_attentions

from .test_train import FAST, _run, _run_killed_at

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"),
]
CUDA = torch.device("cuda")
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would make every CUDA/CPU comparison loose; the comparisons here are about the code."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _adapted(tiny_config, tiny_checkpoint, method, device):
    loaded = load_backbone(tiny_config, str(tiny_checkpoint), device=device)
    torch.manual_seed(3)  # the same A and B on both devices
    apply_adapters(loaded.model, method, blocks=4, targets=("q", "k", "v", "o"))
    for _, _, attn in adapted_attentions(loaded.model):
        for adapter in attn.adapters.values():
            adapter.lora_B.data.normal_(0, 0.05)
    return loaded.model.to(device).eval()


@pytest.mark.parametrize("method", ["lora", "blocklora"])
def test_adapted_model_on_cuda_matches_the_cpu_and_merges_alike(tiny_config, tiny_checkpoint, method):
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cpu = _adapted(tiny_config, tiny_checkpoint, method, torch.device("cpu"))
    gpu = _adapted(tiny_config, tiny_checkpoint, method, CUDA)
    with torch.no_grad():
        expected = cpu.encode_image(images)
        adapted = gpu.encode_image(images.to(CUDA)).cpu()
        merge_adapters(gpu)
        merged = gpu.encode_image(images.to(CUDA)).cpu()
    assert torch.allclose(adapted, expected, atol=1e-4)
    assert torch.allclose(merged, expected, atol=1e-4)


@pytest.mark.parametrize(("method", "extra"), [("lora", {}), ("blocklora", {"blocks": 4})])
def test_a_tiny_run_trains_on_cuda_under_fp16(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, method, extra
):
    hp = {**FAST, **extra, "precision": "fp16"}
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, method, hp, device="cuda")
    assert record["device"].startswith("cuda")
    assert record["peak_memory_mib"] > 0
    assert record["train_stats"]["loss_last"] < 0.5 * record["train_stats"]["loss_first"]
    assert record["accuracy"] >= 0.75


def test_a_run_compiled_with_cuda_graphs_trains_as_the_eager_one(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    torch._dynamo.reset()
    hp = {**FAST, "iterations": 8, "batch_size": 20, "blocks": 4, "precision": "fp32"}
    eager = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "eager", "blocklora", hp, device="cuda"
    )
    compiled = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "compiled", "blocklora",
        {**hp, "compile": "reduce-overhead"}, device="cuda",
    )  # fmt: skip
    for key in ("loss_first", "loss_last"):
        assert compiled["train_stats"][key] == pytest.approx(eager["train_stats"][key], rel=1e-3)
    assert compiled["accuracy"] == eager["accuracy"]


def test_a_run_resumed_on_cuda_draws_the_dropout_masks_of_an_uninterrupted_one(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    """Dropout on the GPU draws from the CUDA generator: a checkpoint must carry and restore it."""
    hp = {**FAST, "iterations": 12, "checkpoint_every": 5, "dropout": 0.25, "blocks": 4, "precision": "fp32"}
    reference = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "ref", "blocklora", hp, device="cuda"
    )
    _run_killed_at(
        8, tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "cut", "blocklora", hp, device="cuda"
    )
    resumed = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "cut", "blocklora", hp, device="cuda"
    )
    assert resumed["train_stats"]["resumed_from"] == 5
    for key in ("loss_first", "loss_last"):
        assert resumed["train_stats"][key] == pytest.approx(reference["train_stats"][key], rel=1e-5)


@pytest.mark.parametrize("same_size", [True, False])
def test_batched_augment_on_cuda_equals_the_cpu_crop_by_crop(same_size):
    gen = torch.Generator().manual_seed(3)
    shapes = [(37, 53)] * 6 if same_size else [(37, 53), (90, 20), (16, 16), (120, 75), (41, 41), (64, 48)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=gen) for h, w in shapes]

    def make(device, batched):
        return DeviceAugment(
            [img.to(device) for img in images], 24, MEAN, STD, device=device,
            generator=torch.Generator().manual_seed(11), batched=batched,
        )  # fmt: skip

    gpu, cpu = make(CUDA, None), make(torch.device("cpu"), False)
    assert gpu.batched
    for indices in ([0, 1, 2], [5, 4, 3, 2, 1, 0]):
        assert torch.allclose(gpu(indices).cpu(), cpu(indices), atol=2e-3)


def test_the_eval_cache_gives_the_same_batches_on_cuda(toy_dataset, tmp_path):
    images, fewshot = toy_dataset
    entries = json.loads(fewshot.read_text())["test"]
    cached = eval_images(entries, images, 32, cache_dir=tmp_path)
    on_cpu = list(cached.batches(8, torch.device("cpu"), MEAN, STD))
    on_gpu = list(cached.batches(8, CUDA, MEAN, STD))
    assert len(on_cpu) == len(on_gpu)
    for (x_cpu, y_cpu), (x_gpu, y_gpu) in zip(on_cpu, on_gpu, strict=True):
        assert x_gpu.device.type == "cuda"
        assert torch.allclose(x_gpu.cpu(), x_cpu, atol=1e-6)
        assert torch.equal(y_gpu.cpu(), y_cpu)
