import json

from blocklora.cli import main


def test_fewshot_command_writes_the_sampled_subset(toy_dataset, tmp_path):
    _, split = toy_dataset
    out = tmp_path / "fs.json"
    assert main(["fewshot", str(split), "--shots", "2", "--seed", "1", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    full = json.loads(split.read_text())
    assert set(data) == {"train", "val", "test"}
    assert len(data["train"]) == 2 * 4 and len(data["val"]) == 2 * 4
    assert data["test"] == full["test"]


def test_listing_commands(capsys):
    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert "blocklora" in listed and "lora" in listed and "zeroshot" in listed
    assert main(["datasets"]) == 0
    assert "oxford_pets" in capsys.readouterr().out


def test_prepare_names_an_unknown_dataset(tmp_path, caplog):
    assert main(["prepare", "imagenet_x", "--data-root", str(tmp_path)]) == 1
    assert "imagenet_x" in caplog.text and "oxford_pets" in caplog.text
