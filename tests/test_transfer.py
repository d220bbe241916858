import json

import pytest
import torch

from blocklora.data import registry
from blocklora.data.registry import DatasetSpec
from blocklora.evaluate import predict
from blocklora.experiment import run_experiment, run_transfer
from blocklora.methods.lora import LoRA
from blocklora.records import record_problems
from tests.test_train import FAST as TRAIN_FAST

FAST = {**TRAIN_FAST, "blocks": 4}


def _target_split(toy_dataset, tmp_path):
    """Red and blue only, relabelled 0 and 1: a dataset with other classes than the source."""
    _, fewshot = toy_dataset
    full = json.loads(fewshot.read_text())
    relabel = {"red": 0, "blue": 1}
    test = [[p, relabel[name], name] for p, _, name in full["test"] if name in relabel]
    path = tmp_path / "target_split.json"
    path.write_text(json.dumps({"train": [], "val": [], "test": test}))
    return path


@pytest.fixture
def trained(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch):
    for name in ("toy_source", "toy_target"):
        spec = DatasetSpec(
            name=name, title=name, template="a photo of a {}.", image_dir="images", num_classes=4
        )
        monkeypatch.setitem(registry._REGISTRY, name, spec)  # registered for this test only
    images, fewshot = toy_dataset
    run_experiment(
        method="blocklora", dataset="toy_source", fewshot=fewshot, image_root=images, shots=12, seed=1,
        backbone=tiny_config, pretrained=str(tiny_checkpoint), hparams=FAST, record=tmp_path / "src.json",
        state=tmp_path / "src.safetensors", device="cpu", progress=False,
    )  # fmt: skip
    return tmp_path / "src.safetensors"


def _transfer(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, state, method="blocklora"):
    images, fewshot = toy_dataset
    return run_transfer(
        method=method, source="toy_source", source_fewshot=fewshot, state=state, target="toy_target",
        target_split=_target_split(toy_dataset, tmp_path), image_root=images, shots=12, seed=1,
        backbone=tiny_config, pretrained=str(tiny_checkpoint), hparams=FAST, record=tmp_path / "dst.json",
        device="cpu", progress=False,
    )  # fmt: skip


def test_a_class_agnostic_method_transfers_to_a_dataset_with_other_classes(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, trained
):
    record = _transfer(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, trained)
    assert record["dataset"] == "toy_target" and record["source_dataset"] == "toy_source"
    assert record["num_classes"] == 2 and record["test_size"] == 16
    assert record["accuracy"] >= 0.75
    on_disk = json.loads((tmp_path / "dst.json").read_text())
    assert on_disk["inputs"]["state"]
    assert record_problems(on_disk) == []  # workflow/schemas/record.schema.json


def test_a_class_specific_method_is_refused_on_other_classes(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, trained, monkeypatch
):
    monkeypatch.setattr(LoRA, "class_agnostic", False)
    with pytest.raises(ValueError, match="tied to toy_source's classes"):
        _transfer(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, trained)


def test_predictions_can_be_restricted_to_a_label_subset():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 0.0, 9.0, 1.0]])
    assert predict(logits).tolist() == [1, 2]
    assert predict(logits, [0, 3]).tolist() == [3, 0]


def test_a_target_with_a_subset_of_imagenets_classes_is_scored_on_those_classes_only(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, trained, monkeypatch
):
    """As ImageNet-A and -R: the source's labels, two of its four classes present."""
    for name in ("toy_source", "toy_a"):
        spec = DatasetSpec(
            name=name,
            title=name,
            template="a photo of a {}.",
            image_dir="images",
            num_classes=4,
            imagenet_labels=True,
        )
        monkeypatch.setitem(registry._REGISTRY, name, spec)
    images, fewshot = toy_dataset
    full = json.loads(fewshot.read_text())
    subset = [e for e in full["test"] if e[1] in (0, 2)]  # ImageNet labels kept
    target = tmp_path / "toy_a.json"
    target.write_text(json.dumps({"train": [], "val": [], "test": subset}))
    kept = []
    original = predict

    def recording(logits, label_subset=None):
        kept.append(label_subset)
        return original(logits, label_subset)

    import blocklora.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "predict", recording)
    record = run_transfer(
        method="blocklora", source="toy_source", source_fewshot=fewshot, state=trained, target="toy_a",
        target_split=target, image_root=images, shots=12, seed=1, backbone=tiny_config,
        pretrained=str(tiny_checkpoint), hparams=FAST, record=tmp_path / "a.json", device="cpu", progress=False,
    )  # fmt: skip
    assert record["num_classes"] == 4 and record["label_subset"] == 2 and record["test_size"] == len(subset)
    assert kept and all(list(s) == [0, 2] for s in kept)  # only the classes present compete
