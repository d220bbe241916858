"""The run record: its published schema, the check on reading, and the helper (and `blocklora record`)
that writes one from what an external script knows."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from blocklora.cli import main as cli_main
from blocklora.records import (
    PROTOCOL_VERSION,
    RECORD_SCHEMA,
    RecordError,
    file_sha256,
    read_record,
    record_problems,
    write_record,
)

KNOWN = {
    "method": "knn_baseline",
    "dataset": "dtd",
    "shots": 4,
    "seed": 2,
    "backbone": "ViT-B-16",
    "accuracy": 0.625,
    "test_size": 1692,
    "num_classes": 47,
    "device": "cpu",
}


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    """A few-shot file, a split file and a checkpoint file to name as inputs."""
    made = {}
    for name, text in (("fewshot", '{"train": []}'), ("split", '{"test": []}'), ("weights", "w")):
        made[name] = tmp_path / f"{name}.json"
        made[name].write_text(text)
    return made


def test_the_schema_is_valid_json_schema_2020_12():
    schema = json.loads(RECORD_SCHEMA.read_text())
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert RECORD_SCHEMA.relative_to(Path(__file__).resolve().parents[1]).as_posix() == (
        "workflow/schemas/record.schema.json"
    )


def test_write_record_fills_in_the_provenance_and_reads_back_valid(tmp_path, files):
    path = tmp_path / "run" / "record.json"
    written = write_record(
        path,
        **KNOWN,
        pretrained=str(files["weights"]),
        hparams={"k": 20, "grid": (1, 2)},
        inputs={"fewshot": files["fewshot"], "split": str(files["split"])},
        code_version="abc123",
        rule="knn_baseline",
        command=["python", "knn.py", "--k", "20"],
    )
    assert read_record(path) == written and record_problems(written) == []
    assert written["inputs"] == {
        "fewshot": file_sha256(files["fewshot"]),
        "split": file_sha256(files["split"]),
        "pretrained": file_sha256(files["weights"]),  # a checkpoint file is an input too
    }
    assert written["command"] == "python knn.py --k 20" and written["code_version"] == "abc123"
    assert written["external"] is True and written["rule"] == "knn_baseline"
    assert written["protocol_version"] == PROTOCOL_VERSION and written["hparams"]["grid"] == [1, 2]
    assert written["trainable_params"] == 0 and written["iterations"] is None
    assert re.fullmatch(r"[0-9a-f]{64}", written["config_hash"]) and written["versions"]["python"]
    assert not list(path.parent.glob(".*.tmp"))  # written atomically
    again = write_record(tmp_path / "again.json", **KNOWN, pretrained="openai")
    assert again["inputs"] == {} and again["pretrained"] == "openai"
    assert shlex.split(again["command"])[1:] == sys.argv  # this process's command line by default
    assert write_record(tmp_path / "r.json", **KNOWN, pretrained="none")["pretrained"] is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"accuracy": 72.3}, r"field 'accuracy': 72.3 is greater than the maximum of 1; give accuracy as a fraction \(0.723 for 72.3 %\)"),
        ({"accuracy": float("nan")}, r"field 'accuracy': nan is not a finite number"),
        ({"shots": 0}, r"field 'shots': 0 is less than the minimum of 1"),
        ({"test_size": "1692"}, r"field 'test_size': '1692' is not of type 'integer'"),
    ],
)  # fmt: skip
def test_write_record_refuses_what_breaks_the_schema_and_writes_nothing(tmp_path, change, message):
    path = tmp_path / "record.json"
    with pytest.raises(RecordError, match=rf"not writing the record {re.escape(str(path))}: {message}"):
        write_record(path, **{**KNOWN, **change}, pretrained=None)
    assert not path.exists()


def test_write_record_names_an_input_that_is_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input 'fewshot' of the record .*: no file .*missing\.json"):
        write_record(
            tmp_path / "r.json", **KNOWN, pretrained=None, inputs={"fewshot": tmp_path / "missing.json"}
        )


def _written(tmp_path: Path, **changes) -> Path:
    record = write_record(tmp_path / "made.json", **KNOWN, pretrained=None)
    path = tmp_path / "runs" / "record.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: v for k, v in {**record, **changes}.items() if v is not ...}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"accuracy": ...}, "field 'accuracy': missing"),
        ({"accuracy": 1.7}, "field 'accuracy': 1.7 is greater than the maximum of 1"),
        ({"shots": "four"}, "field 'shots': 'four' is not of type 'integer', 'null'"),
        ({"inputs": {"fewshot": "not a hash"}}, "field 'inputs.fewshot': 'not a hash' does not match"),
        ({"command": ...}, "field 'command': missing"),  # an external record carries its provenance
    ],
)
def test_a_record_that_breaks_the_schema_is_refused_naming_file_and_field(tmp_path, changes, message):
    path = _written(tmp_path, **changes)
    with pytest.raises(RecordError) as err:
        read_record(path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "workflow/schemas/record.schema.json" in str(err.value)


def test_the_record_command_writes_a_valid_record_without_importing_torch(tmp_path, files):
    path = tmp_path / "record.json"
    argv = [
        "record", "--record", str(path), "--method", "mine", "--dataset", "dtd", "--shots", "4",
        "--seed", "1", "--backbone", "ViT-B-16", "--pretrained", "openai", "--accuracy", "0.5",
        "--test-size", "10", "--num-classes", "2", "--device", "cpu", "--trainable-params", "1024",
        "--train-seconds", "12.5", "--hparams", '{"lr": 0.01}', "--input", f"fewshot={files['fewshot']}",
        "--code-version", "v1.2", "--rule", "mine",
    ]  # fmt: skip
    code = (
        "import sys; from blocklora.cli import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules, 'pandas' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines()[-1] == "0 False False", result.stderr
    record = read_record(path)
    assert record["trainable_params"] == 1024 and record["train_seconds"] == 12.5
    assert record["hparams"] == {"lr": 0.01} and record["code_version"] == "v1.2"
    assert record["inputs"] == {"fewshot": file_sha256(files["fewshot"])}
    assert record["command"].startswith("blocklora record --record ")


def test_the_record_command_explains_what_it_cannot_take(tmp_path, caplog):
    base = ["record", "--record", str(tmp_path / "r.json"), "--method", "m", "--dataset", "dtd",
            "--backbone", "b", "--accuracy", "0.5", "--test-size", "3", "--num-classes", "2", "--device", "cpu"]  # fmt: skip
    assert cli_main([*base, "--shots", "4"]) == 1
    assert "give --shots and --seed together" in caplog.text
    assert cli_main([*base, "--accuracy", "50"]) == 1
    assert "field 'accuracy': 50.0 is greater than the maximum of 1" in caplog.text
    with pytest.raises(SystemExit):
        cli_main([*base, "--input", "fewshot"])  # not NAME=PATH
    assert not (tmp_path / "r.json").exists()
