import json
import re

import open_clip
import pytest
import torch

from blocklora import apply_adapters, load_adapters, load_backbone, merge_adapters, save_adapters
from blocklora.inject import adapted_attentions
from blocklora.io import atomic_path, read_tensors, write_json, write_tensors

IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
PROMPTS = ["a photo of a red thing.", "a photo of a blue thing."]


def _adapted(config, checkpoint, **kwargs):
    backbone = load_backbone(config, str(checkpoint))
    apply_adapters(backbone.model, kwargs.pop("kind", "blocklora"), blocks=4, **kwargs)
    return backbone


def _train_like(backbone, seed):
    torch.manual_seed(seed)
    for _, _, attn in adapted_attentions(backbone.model):
        for adapter in attn.adapters.values():
            adapter.lora_A.data.normal_()
            adapter.lora_B.data.normal_(0, 0.05)


@torch.no_grad()
def _logits(backbone):
    return backbone.encode_image(IMAGES) @ backbone.encode_text(PROMPTS).T


def test_save_load_round_trip_reproduces_logits(tiny_config, tiny_checkpoint, tmp_path):
    trained = _adapted(tiny_config, tiny_checkpoint)
    _train_like(trained, 0)
    path = tmp_path / "task.safetensors"
    save_adapters(trained.model, path)
    tensors, meta = read_tensors(path)
    assert all("lora_" in k for k in tensors)
    assert meta["config"]["blocks"] == 4 and meta["backbone"]["name"] == tiny_config
    assert path.stat().st_size < 100_000
    fresh = _adapted(tiny_config, tiny_checkpoint)
    load_adapters(fresh.model, path)
    torch.testing.assert_close(_logits(fresh), _logits(trained))


def test_task_swap_on_a_merged_model_does_not_reload_the_base(tiny_config, tiny_checkpoint, tmp_path):
    backbone = _adapted(tiny_config, tiny_checkpoint)
    _train_like(backbone, 1)
    save_adapters(backbone.model, tmp_path / "a.safetensors")
    logits_a = _logits(backbone)
    _train_like(backbone, 2)
    save_adapters(backbone.model, tmp_path / "b.safetensors")
    logits_b = _logits(backbone)
    merge_adapters(backbone.model)
    weight = backbone.model.visual.transformer.resblocks[0].attn.in_proj_weight
    load_adapters(backbone.model, tmp_path / "a.safetensors")
    torch.testing.assert_close(_logits(backbone), logits_a, rtol=1e-4, atol=1e-5)
    load_adapters(backbone.model, tmp_path / "b.safetensors")
    torch.testing.assert_close(_logits(backbone), logits_b, rtol=1e-4, atol=1e-5)
    assert backbone.model.visual.transformer.resblocks[0].attn.in_proj_weight is weight


def test_adapters_from_another_configuration_or_backbone_are_refused(tiny_config, tiny_checkpoint, tmp_path):
    source = _adapted(tiny_config, tiny_checkpoint)
    path = tmp_path / "a.safetensors"
    save_adapters(source.model, path)
    other_rank = _adapted(tiny_config, tiny_checkpoint, rank=4)
    with pytest.raises(ValueError, match="rank: file 2 vs model 4"):
        load_adapters(other_rank.model, path)
    lora = _adapted(tiny_config, tiny_checkpoint, kind="lora")
    with pytest.raises(ValueError, match="kind: file 'blocklora' vs model 'lora'"):
        load_adapters(lora.model, path)
    vit = load_backbone("ViT-B-16", None)
    apply_adapters(vit.model, "blocklora", blocks=4)
    with pytest.raises(ValueError, match=f"trained on backbone {tiny_config}"):
        load_adapters(vit.model, path)


def test_a_failed_write_leaves_the_previous_file_intact(tmp_path):
    path = tmp_path / "record.json"
    write_json(path, {"accuracy": 0.5})
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text('{"accuracy": 0.9, "trunc')
        raise RuntimeError("disk full")
    assert json.loads(path.read_text()) == {"accuracy": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_adapters_load_onto_a_fresh_backbone_and_reproduce_the_trained_logits(
    tiny_config, tiny_checkpoint, tmp_path
):
    trained = _adapted(tiny_config, tiny_checkpoint, targets=("q", "v", "o"), layers=[1], init="matched")
    _train_like(trained, 5)
    path = tmp_path / "task.safetensors"
    save_adapters(trained.model, path)
    expected = _logits(trained)
    fresh = load_backbone(tiny_config, str(tiny_checkpoint))  # no adapters yet: built from the file
    meta = load_adapters(fresh.model, path)
    assert meta["config"]["blocks"] == 4 and meta["config"]["init"] == "matched"
    assert sum(len(attn.adapters) for _, _, attn in adapted_attentions(fresh.model)) == 2 * 3
    torch.testing.assert_close(_logits(fresh), expected, rtol=1e-5, atol=1e-6)
    merge_adapters(fresh.model)
    torch.testing.assert_close(_logits(fresh), expected, rtol=1e-4, atol=1e-5)


def test_an_adapter_file_for_another_backbone_is_refused_by_a_fresh_one(
    tiny_config, tiny_checkpoint, tmp_path
):
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    with pytest.raises(ValueError, match=f"trained on backbone {tiny_config}"):
        load_adapters(load_backbone("ViT-B-16", None).model, path)
    tensors, meta = read_tensors(path)
    meta["config"]["blocks"] = 5  # a shape this backbone's widths cannot take
    from blocklora.io import write_tensors

    write_tensors(path, tensors, meta)
    with pytest.raises(ValueError, match=r"cannot take: .*blocks=5 does not divide"):
        load_adapters(load_backbone(tiny_config, str(tiny_checkpoint)).model, path)


def test_an_adapter_file_for_other_weights_of_the_same_architecture_is_refused(
    tiny_config, tiny_checkpoint, tmp_path
):
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(open_clip.create_model(tiny_config).state_dict(), other)
    with pytest.raises(
        ValueError,
        match=f"trained on backbone {tiny_config} / tiny.pt, but this model is {tiny_config} / other.pt",
    ):
        load_adapters(_adapted(tiny_config, other).model, path)


def test_a_fresh_backbone_names_the_backbone_a_file_was_made_for_before_trying_its_adapters(
    tiny_config, tiny_checkpoint, tmp_path
):
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    tensors, meta = read_tensors(path)
    meta["backbone"]["name"], meta["config"]["layers"] = "ViT-B-16", [11]  # a layer the tiny model lacks
    write_tensors(path, tensors, meta)
    with pytest.raises(ValueError, match="trained on backbone ViT-B-16"):
        load_adapters(load_backbone(tiny_config, str(tiny_checkpoint)).model, path)


def test_an_adapter_file_missing_a_tensor_or_with_a_wrong_shape_is_refused(
    tiny_config, tiny_checkpoint, tmp_path
):
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    tensors, meta = read_tensors(path)
    key = sorted(tensors)[0]
    write_tensors(path, {k: v for k, v in tensors.items() if k != key}, meta)
    with pytest.raises(
        ValueError, match=rf"does not match the model's adapters: missing \['{key}'\], unexpected \[\]"
    ):
        load_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    write_tensors(path, {**tensors, key: tensors[key][:, :1].contiguous()}, meta)
    with pytest.raises(ValueError, match=rf"{key} has shape"):
        load_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)


def test_a_lock_file_planted_as_a_symlink_in_a_shared_folder_is_refused_not_truncated(tmp_path):
    """Results folders are group-writable: a link at <file>.lock must not make us empty its target."""
    from blocklora.io import exclusive

    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "pixels.npy.lock").symlink_to(victim)
    with (
        pytest.raises(OSError, match=r"pixels\.npy\.lock is a symlink; refusing to use it as a lock file"),
        exclusive(cache / "pixels.npy"),
    ):
        pass
    assert victim.read_text() == "precious"


def test_a_lock_held_elsewhere_is_waited_for_up_to_a_timeout_naming_its_holder(tmp_path):
    import subprocess
    import sys

    from blocklora.io import exclusive

    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,sys,time; f=open(sys.argv[1],'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); time.sleep(30)", str(tmp_path / "x.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(TimeoutError, match=rf"x\.lock is still locked after 0 s \(by pid {holder.pid};"),
            exclusive(tmp_path / "x", timeout=0.2),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path / "x", timeout=5):  # the holder is gone: the lock is free again
        pass


def test_an_adapter_file_for_other_weights_under_the_same_file_name_is_refused(tiny_config, tmp_path):
    """Two checkpoints called tiny.pt (two runs of the demo's pre-training, a colleague's copy): the
    file name says nothing; the sha256 of the weights does."""
    checkpoints = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"run{seed}" / "tiny.pt"
        path.parent.mkdir()
        torch.save(open_clip.create_model(tiny_config).state_dict(), path)
        checkpoints.append(path)
    adapters = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, checkpoints[0]).model, adapters)
    for model in (
        _adapted(tiny_config, checkpoints[1]).model,
        load_backbone(tiny_config, str(checkpoints[1])).model,
    ):
        with pytest.raises(
            ValueError, match=r"weights of sha256 [0-9a-f]{64}, but this model's weights hash to"
        ):
            load_adapters(model, adapters)
    load_adapters(load_backbone(tiny_config, str(checkpoints[0])).model, adapters)  # its own weights: fine


@pytest.mark.parametrize("dropped", ["weights_sha256", "name", "backbone"])
def test_an_adapter_file_that_does_not_say_which_backbone_it_was_trained_on_is_refused(
    tiny_config, tiny_checkpoint, tmp_path, dropped
):
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    tensors, meta = read_tensors(path)
    if dropped == "backbone":
        del meta["backbone"]
    else:
        del meta["backbone"][dropped]
    write_tensors(path, tensors, meta)
    for model in (
        _adapted(tiny_config, tiny_checkpoint).model,
        load_backbone(tiny_config, str(tiny_checkpoint)).model,
    ):
        with pytest.raises(ValueError, match=r"lacks backbone\.\w+.* in its metadata.*retrain it"):
            load_adapters(model, path)


def test_an_adapter_tensor_is_never_broadcast_or_cast_into_the_model(tiny_config, tiny_checkpoint, tmp_path):
    """A (4,) row where a (2, 4) matrix belongs would broadcast through copy_; a float64 would cast."""
    path = tmp_path / "a.safetensors"
    save_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
    tensors, meta = read_tensors(path)
    key = next(k for k in sorted(tensors) if k.endswith("lora_A"))
    for wrong in (tensors[key][0].contiguous(), tensors[key].double()):
        write_tensors(path, {**tensors, key: wrong}, meta)
        with pytest.raises(
            ValueError, match=re.escape(f"{key} has shape {tuple(wrong.shape)} and dtype {wrong.dtype}")
        ):
            load_adapters(_adapted(tiny_config, tiny_checkpoint).model, path)
