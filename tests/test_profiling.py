import importlib.util
import json
from pathlib import Path

import open_clip
import pytest
import torch
from torch import nn

from blocklora.adapters import LowRankAdapter, adapter_parameter_count
from blocklora.cli import main as cli_main
from blocklora.inject import AdaptedAttention
from blocklora.profiling import count_flops, profile_method

PROFILE_KEYS = {
    "method", "backbone", "pretrained", "num_classes", "batch_size", "device", "trainable_params",
    "total_params", "train_flops_per_step", "step_ms", "peak_memory_mib", "latency_ms_merged",
    "latency_ms_frozen", "latency_ratio", "throughput_merged", "throughput_frozen", "versions", "created",
}  # fmt: skip
BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def vit_forward_flops(cfg: dict, batch: int) -> int:
    """Analytic FLOPs (2 per multiply-add) of an open_clip ViT image forward with the projection."""
    v = cfg["vision_cfg"]
    width, patch, layers = v["width"], v["patch_size"], v["layers"]
    patches = (v["image_size"] // patch) ** 2
    tokens = patches + 1  # + class token
    mlp = int(width * v.get("mlp_ratio", 4.0))
    patch_embed = 2 * patches * width * 3 * patch * patch
    per_layer = (
        2 * tokens * width * 3 * width  # q, k, v
        + 2 * tokens * width * width  # output projection
        + 2 * 2 * tokens * width * mlp  # MLP up and down
        + 2 * 2 * tokens * tokens * width  # attention: Q K^T and A V over all heads
    )
    return batch * (patch_embed + layers * per_layer + 2 * width * cfg["embed_dim"])


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("train_step_benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _profile(tiny_config, tiny_checkpoint, method, tmp_path, **kwargs):
    return profile_method(
        method,
        tiny_config,
        str(tiny_checkpoint),
        num_classes=kwargs.pop("num_classes", 5),
        hparams=kwargs.pop("hparams", {}),
        batch_size=4,
        device="cpu",
        warmup=1,
        steps=2,
        out=tmp_path / f"{method}.json",
        **kwargs,
    )


@pytest.fixture(scope="module")
def profiles(tiny_config, tiny_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("profiles")
    return {
        m: _profile(tiny_config, tiny_checkpoint, m, folder) | {"path": folder / f"{m}.json"}
        for m in ("lora", "blocklora", "zeroshot")
    }


def test_profiles_count_the_adapters_of_lora_and_blocklora_on_the_same_frozen_backbone(profiles):
    lora, block = profiles["lora"], profiles["blocklora"]
    width, adapted = 64, 2 * 2 * 3  # two encoders x two layers x (q, k, v), both towers 64 wide
    assert lora["trainable_params"] == adapted * adapter_parameter_count(width, width, rank=2)
    assert block["trainable_params"] == adapted * adapter_parameter_count(width, width, rank=2, blocks=8)
    frozen = profiles["zeroshot"]["total_params"]
    assert profiles["zeroshot"]["trainable_params"] == 0
    assert lora["total_params"] - lora["trainable_params"] == frozen
    assert block["total_params"] - block["trainable_params"] == frozen


def test_blocklora_costs_no_more_training_flops_than_lora_at_equal_rank(profiles):
    lora, block = profiles["lora"]["train_flops_per_step"], profiles["blocklora"]["train_flops_per_step"]
    assert lora > 0 and block > 0
    assert block <= lora


def test_a_profile_has_step_time_latency_and_is_written_as_json(profiles):
    for name in ("lora", "blocklora"):
        p = profiles[name]
        assert p["train_step"] == "generic-loop"
        assert p["step_ms"] > 0 and len(p["step_ms_samples"]) == 2
        assert p["peak_memory_mib"] is None  # CPU
        assert p["latency_ratio"] == pytest.approx(p["latency_ms_merged"] / p["latency_ms_frozen"])
        assert p["throughput_merged"] == pytest.approx(4 / (p["latency_ms_merged"] / 1e3))
        on_disk = json.loads(p["path"].read_text())
        assert set(on_disk) >= PROFILE_KEYS
        assert on_disk["method"] == name and on_disk["num_classes"] == 5 and on_disk["batch_size"] == 4
        assert on_disk["train_flops_per_step"] == p["train_flops_per_step"]


def test_merged_inference_costs_the_frozen_backbones_flops(profiles):
    flops = {p["inference_flops_per_image"] for p in profiles.values()}
    assert len(flops) == 1


def test_a_method_without_a_training_step_reports_none(profiles):
    p = profiles["zeroshot"]
    assert p["train_step"] is None
    assert p["train_flops_per_step"] is None and p["step_ms"] is None and p["peak_memory_mib"] is None
    assert p["latency_ratio"] > 0


def test_the_flop_counter_counts_attention_in_a_vit_forward(tiny_config):
    model = open_clip.create_model(tiny_config).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        counted = count_flops(lambda: model.encode_image(images))
    assert counted == vit_forward_flops(open_clip.get_model_config(tiny_config), batch=2)


def test_the_analytic_count_gives_the_known_vit_b16_figure():
    cfg = {"embed_dim": 512, "vision_cfg": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12}}
    assert vit_forward_flops(cfg, batch=1) / 1e9 == pytest.approx(35.13, abs=0.005)


@pytest.mark.slow
def test_vit_b16_image_forward_counts_35_13_gflop():
    model = open_clip.create_model("ViT-B-16").eval()
    with torch.no_grad():
        counted = count_flops(lambda: model.encode_image(torch.randn(1, 3, 224, 224)))
    assert counted / 1e9 == pytest.approx(35.13, abs=0.005)


def test_the_profile_command_writes_its_json(tiny_config, tiny_checkpoint, tmp_path):
    out = tmp_path / "profile" / "blocklora_n4.json"
    argv = ["profile", "--method", "blocklora", "--backbone", tiny_config,
            "--pretrained", str(tiny_checkpoint), "--classes", "3", "--hparams", '{"blocks": 4}',
            "--out", str(out), "--device", "cpu", "--batch-size", "2", "--steps", "1", "--warmup", "0"]  # fmt: skip
    assert cli_main(argv) == 0
    record = json.loads(out.read_text())
    assert record["method"] == "blocklora"
    assert record["hparams"]["blocks"] == 4 and record["num_classes"] == 3 and record["batch_size"] == 2


def test_the_profile_command_rejects_unknown_hyper_parameters(tiny_config, tmp_path):
    with pytest.raises(ValueError, match="unknown hyper-parameter"):
        profile_method("lora", tiny_config, None, num_classes=2, hparams={"nope": 1}, device="cpu")


@pytest.mark.slow
def test_the_train_step_benchmark_runs_small(bench, tiny_config, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--small", "--backbone", tiny_config, "--classes", "3", "--steps", "1", "--warmup", "0",
            "--device", "cpu", "--flops", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    by_variant = {r["variant"]: r for r in results}
    assert {"reference", "lora", "blocklora"} <= set(by_variant)
    assert by_variant["reference"]["speedup_vs_reference"] == 1.0
    assert by_variant["reference"]["text_tokens"] == 77  # no truncation
    assert by_variant["lora"]["text_tokens"] < 77
    assert by_variant["reference"]["trainable_params"] == by_variant["lora"]["trainable_params"]
    assert by_variant["reference"]["train_flops_per_step"] > by_variant["lora"]["train_flops_per_step"]
    if "coop" in by_variant:  # only its context trains: the backbone is frozen as in a real run
        assert by_variant["coop"]["trainable_params"] == 16 * 64
    assert "speed-up vs reference" in capsys.readouterr().out


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_benchmark_reference_attention_computes_what_the_adapted_attention_computes(bench, batch_first):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    reference = bench.ReferenceAttention(mha, ["q", "k", "v"], rank=2, alpha=1.0, dropout=0.0, scaling="sqrt")
    adapters = {t: LowRankAdapter(32, 32, rank=2) for t in "qkv"}
    for t, adapter in adapters.items():
        nn.init.normal_(adapter.lora_B)
        getattr(reference, f"{t}_proj").adapter.load_state_dict(adapter.state_dict())
    adapted = AdaptedAttention(mha, adapters).eval()
    x = torch.randn(3, 5, 32) if batch_first else torch.randn(5, 3, 32)  # 3 sequences of 5
    mask = torch.triu(torch.full((5, 5), float("-inf")), diagonal=1)
    expected = adapted(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.allclose(reference(x, x, x, need_weights=False, attn_mask=mask)[0], expected, atol=1e-5)
    frozen = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert not torch.allclose(expected, frozen, atol=1e-3)  # the adapters do change the output


def test_the_augmentation_benchmark_times_both_paths_on_the_same_crops(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("augment_benchmark", BENCHMARK.with_name("augment.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "augment.json"
    argv = ["--device", "cpu", "--batch-size", "4", "--size", "16", "--images", "6", "--steps", "2",
            "--warmup", "1", "--out", str(out)]  # fmt: skip
    assert module.main(argv) == 0
    results = json.loads(out.read_text())["results"]
    assert [r["images"] for r in results] == ["one size 375x500", "mixed 250-640 px"]
    for r in results:
        assert r["max_abs_difference"] < 1e-4
        assert r["per-crop_ms"] > 0 and r["batched_ms"] > 0
    assert "| per-crop ms | batched ms |" in capsys.readouterr().out
