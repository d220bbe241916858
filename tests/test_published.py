"""Published numbers: the shipped file, and a malformed one stopped with its file, entry and field named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from blocklora.published import (
    FEW_SHOT_DATASETS,
    PublishedError,
    load_published,
    normalize_backbone,
    same_backbone,
)

SHIPPED = Path(__file__).resolve().parents[1] / "workflow" / "published" / "few_shot.yaml"


def test_the_shipped_file_loads_and_plot_pp_averages_its_eleven_datasets():
    entries = {e.method: e for e in load_published(SHIPPED)}
    assert set(entries) == {"PLOT++", "CLIP-LoRA"}
    plot = entries["PLOT++"]
    assert set(plot.accuracy) == set(FEW_SHOT_DATASETS)
    assert round(plot.average(1), 2) == 70.71 and round(plot.average(16), 2) == 82.09
    assert plot.average_is_computed(1) and plot.value("caltech101", 1) == 94.34
    clip_lora = entries["CLIP-LoRA"]
    assert [clip_lora.average(k) for k in (1, 2, 4, 8, 16)] == [72.5, 75.4, 77.4, 80.3, 83.0]
    assert not clip_lora.average_is_computed(16) and clip_lora.value("dtd", 16) is None
    for entry in entries.values():
        assert entry.backbone == "ViT-B/16" and entry.url.startswith("https://") and entry.source
        assert entry.title == f"{entry.method} (published)"


def test_an_average_needs_all_eleven_datasets_when_none_is_published(tmp_path):
    path = tmp_path / "few.yaml"
    path.write_text(
        yaml.safe_dump(
            [{"method": "X", "backbone": "ViT-B/16", "source": "s", "url": "u", "accuracy": {"dtd": {1: 50}}}]
        )
    )
    (entry,) = load_published(path)
    assert entry.average(1) is None and not entry.average_is_computed(1)


GOOD = {
    "method": "Good",
    "backbone": "ViT-B/16",
    "source": "Someone et al., 2024",
    "url": "https://example.org",
    "accuracy": {"dtd": {1: 50.0}},
}


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            {"accuracy": {"dtd2": {1: 50.0}}},
            "accuracy.dtd2",
            r"unknown dataset 'dtd2'; use this project's names",
        ),
        ({"accuracy": {"dtd": [50.0]}}, "accuracy.dtd", r"expected accuracies by shot count"),
        ({"accuracy": {"dtd": {0: 50.0}}}, "accuracy.dtd", r"shot count 0 is not a positive integer"),
        ({"accuracy": {"dtd": {"4": 50.0}}}, "accuracy.dtd", r"shot count '4' is not a positive integer"),
        ({"accuracy": {"dtd": {1.5: 50.0}}}, "accuracy.dtd", r"shot count 1.5 is not a positive integer"),
        (
            {"accuracy": {"dtd": {1: 100.5}}},
            "accuracy.dtd.1",
            r"accuracy 100.5 is not a percentage between 0",
        ),
        ({"accuracy": {"dtd": {1: -1}}}, "accuracy.dtd.1", r"accuracy -1 is not a percentage"),
        ({"accuracy": {"dtd": {1: "high"}}}, "accuracy.dtd.1", r"accuracy 'high' is not a percentage"),
        ({"source": None}, "source", r"missing; give the citation"),
        ({"source": ""}, "source", r"must be text, got ''"),
        ({"url": None}, "url", r"missing; give where the numbers are published"),
        ({"accuracy": None}, "accuracy", r"missing; write `accuracy:"),
        ({"acuracy": {}}, None, r"unknown field\(s\) \['acuracy'\]"),
    ],
)
def test_a_malformed_entry_names_the_file_the_entry_and_the_field(tmp_path, change, field, message):
    bad = {**GOOD, "method": "Bad", **change}
    path = tmp_path / "published.yaml"
    path.write_text(yaml.safe_dump([GOOD, {k: v for k, v in bad.items() if v is not None}], sort_keys=False))
    where = re.escape(f"{path}, entry 2 (Bad)") + (rf", field `{re.escape(field)}`" if field else "")
    with pytest.raises(PublishedError, match=rf"^{where}: {message}"):
        load_published(path)


def test_a_file_that_is_not_a_list_of_entries_or_not_yaml_is_named(tmp_path):
    path = tmp_path / "published.yaml"
    path.write_text("method: PLOT++\n")
    with pytest.raises(PublishedError, match=rf"{re.escape(str(path))}: expected a YAML list of entries"):
        load_published(path)
    path.write_text("- method: [unclosed\n")
    with pytest.raises(PublishedError, match=rf"{re.escape(str(path))} are not valid YAML"):
        load_published(path)
    with pytest.raises(
        PublishedError, match=r"cannot read published numbers .*missing.yaml.*published: null"
    ):
        load_published(tmp_path / "missing.yaml")
    path.write_text(yaml.safe_dump([GOOD, GOOD]))
    with pytest.raises(PublishedError, match=r"entry 2 \(Good\), field `method`: entry 1 has the same name"):
        load_published(path)


def test_backbones_compare_across_spellings():
    assert same_backbone("ViT-B-16", "ViT-B/16") and same_backbone("ViT-B-16-quickgelu", "vit_b_16")
    assert not same_backbone("ViT-B-32", "ViT-B/16") and not same_backbone("demo-tiny", "ViT-B/16")
    assert normalize_backbone("ViT-L/14@336px") == "vitl14336px"
