import functools
import json
import logging
import re
import statistics
import time

import pytest
import torch

from blocklora import experiment, train
from blocklora.cli import main
from blocklora.experiment import build_run, run_experiment
from blocklora.methods import FewShotTask, configured_method
from blocklora.methods.lora import LoRA
from blocklora.records import record_problems
from blocklora.train import BatchSampler, TrainStep, compile_options, cosine_lr, make_optimizer

FAST = {
    "iterations": 60,
    "lr": 5e-3,
    "rank": 4,
    "batch_size": 16,
    "dropout": 0.0,
    "log_every": 10,
}
RECORD_KEYS = {
    "method", "dataset", "shots", "seed", "backbone", "pretrained", "accuracy", "num_classes",
    "test_size", "trainable_params", "total_params", "iterations", "train_seconds", "eval_seconds",
    "peak_memory_mib", "device", "hparams", "versions", "git_commit", "created", "protocol_version",
    "config_hash", "inputs", "inputs_hash", "template",
}  # fmt: skip


def _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, method, hparams, **kwargs):
    images, fewshot = toy_dataset
    return run_experiment(
        method=method,
        dataset="toy",
        fewshot=fewshot,
        image_root=images,
        shots=kwargs.pop("shots", 12),
        seed=kwargs.pop("seed", 1),
        backbone=tiny_config,
        pretrained=str(tiny_checkpoint),
        hparams=hparams,
        record=tmp_path / f"{method}.json",
        state=tmp_path / f"{method}.safetensors",
        device=kwargs.pop("device", "cpu"),
        template="a photo of a {}.",
        progress=kwargs.pop("progress", False),
        **kwargs,
    )


def _run_killed_at(step: int, *args, **kwargs) -> None:
    """``_run(*args, **kwargs)`` interrupted at its training step ``step``, leaving what a kill leaves."""
    original, calls = LoRA.train_logits, {"n": 0}

    def killed(self, images):
        calls["n"] += 1
        if calls["n"] == step:
            raise KeyboardInterrupt("simulated kill")
        return original(self, images)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(LoRA, "train_logits", killed)
        _run(*args, **kwargs)


@pytest.mark.parametrize(("method", "extra"), [("lora", {}), ("blocklora", {"blocks": 4})])
def test_a_tiny_training_run_lowers_the_loss_and_beats_chance(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, method, extra
):
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, method, {**FAST, **extra})
    stats = record["train_stats"]
    assert stats["loss_last"] < 0.5 * stats["loss_first"]
    assert record["accuracy"] >= 0.75  # 4 classes: chance is 0.25
    assert record["iterations"] == 60
    on_disk = json.loads((tmp_path / f"{method}.json").read_text())
    assert set(on_disk) >= RECORD_KEYS
    assert record_problems(on_disk) == []  # workflow/schemas/record.schema.json
    assert on_disk["accuracy"] == record["accuracy"]
    assert on_disk["peak_memory_mib"] is None and on_disk["device"].startswith("cpu")
    assert on_disk["hparams"]["rank"] == 4 and on_disk["hparams"]["weight_decay"] == 1e-2


def test_zero_shot_trains_nothing(tiny_config, tiny_checkpoint, toy_dataset, tmp_path):
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "zeroshot", {})
    assert record["trainable_params"] == 0 and record["iterations"] == 0
    assert record["total_params"] > 1_000_000


def test_same_seed_same_result_on_cpu(tiny_config, tiny_checkpoint, toy_dataset, tmp_path):
    hp = {**FAST, "iterations": 15, "dropout": 0.25}
    a = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "a", "blocklora", {**hp, "blocks": 4})
    b = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "b", "blocklora", {**hp, "blocks": 4})
    assert a["accuracy"] == b["accuracy"]
    assert a["train_stats"] == b["train_stats"]


@pytest.mark.parametrize("bad", [1, 4])
def test_a_nan_loss_stops_the_run_naming_the_iteration(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch, bad
):
    calls = {"n": 0}
    original = LoRA.train_logits

    def poisoned(self, images):
        calls["n"] += 1
        logits = original(self, images)
        return logits * float("nan") if calls["n"] == bad else logits

    monkeypatch.setattr(LoRA, "train_logits", poisoned)
    with pytest.raises(FloatingPointError, match=f"at iteration {bad};"):
        _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", FAST)
    assert not (tmp_path / "lora.json").exists()


def test_unknown_hyper_parameter_is_an_error_naming_it(tiny_config, tiny_checkpoint, toy_dataset, tmp_path):
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['blocks'\] for method 'lora'"):
        _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", {"blocks": 4})


def test_cosine_schedule_matches_torch():
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100, eta_min=1e-6)
    for step in range(100):
        assert cosine_lr(step, total=100, base=2e-4, eta_min=1e-6, warmup=0, warmup_lr=0) == pytest.approx(
            opt.param_groups[0]["lr"], rel=1e-9
        )
        opt.step()
        sched.step()


def test_cli_train_writes_record_and_state(tiny_config, tiny_checkpoint, toy_dataset, tmp_path):
    images, fewshot = toy_dataset
    args = [
        "train", "--method", "blocklora", "--dataset", "toy", "--fewshot", str(fewshot),
        "--image-root", str(images), "--shots", "12", "--seed", "1", "--backbone", tiny_config,
        "--pretrained", str(tiny_checkpoint), "--hparams", json.dumps({**FAST, "iterations": 5, "blocks": 4}),
        "--record", str(tmp_path / "r.json"), "--state", str(tmp_path / "a.safetensors"),
        "--device", "cpu", "--template", "a photo of a {}.", "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    assert json.loads((tmp_path / "r.json").read_text())["method"] == "blocklora"
    assert (tmp_path / "a.safetensors").stat().st_size > 0


def test_cli_reports_an_unknown_method(toy_dataset, tmp_path, caplog):
    images, fewshot = toy_dataset
    args = [
        "train", "--method", "nope", "--dataset", "toy", "--fewshot", str(fewshot), "--image-root", str(images),
        "--shots", "1", "--seed", "1", "--backbone", "x", "--record", str(tmp_path / "r.json"),
        "--state", str(tmp_path / "a.safetensors"),
    ]  # fmt: skip
    assert main(args) == 1
    assert "unknown method 'nope'" in caplog.text and "blocklora" in caplog.text


def test_an_interrupted_run_resumes_from_its_checkpoint_with_identical_metrics(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    hp = {**FAST, "iterations": 20, "checkpoint_every": 5, "dropout": 0.25, "blocks": 4}
    reference = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "ref", "blocklora", hp)

    _run_killed_at(13, tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "cut", "blocklora", hp)
    assert not (tmp_path / "cut" / "blocklora.json").exists()
    assert (tmp_path / "cut" / "blocklora.checkpoint.pt").exists()
    resumed = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "cut", "blocklora", hp)
    assert resumed["train_stats"]["resumed_from"] == 10
    assert resumed["accuracy"] == reference["accuracy"]
    for key in ("loss_first", "loss_last"):
        assert resumed["train_stats"][key] == reference["train_stats"][key]
    assert not (tmp_path / "cut" / "blocklora.checkpoint.pt").exists()


def test_a_checkpoint_of_another_configuration_is_ignored_and_the_run_starts_at_0(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, caplog
):
    hp = {**FAST, "iterations": 10, "checkpoint_every": 5, "blocks": 4}
    folder = tmp_path / "run"
    checkpoint = folder / "blocklora.checkpoint.pt"
    from blocklora.train import save_checkpoint

    save_checkpoint(checkpoint, fingerprint={"method": "blocklora", "hparams": {**hp, "lr": 1.0}}, step=5)
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, folder, "blocklora", hp)
    assert record["train_stats"]["resumed_from"] == 0
    assert f"ignoring checkpoint {checkpoint}: it belongs to another configuration" in caplog.text
    reference = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "ref", "blocklora", hp)
    assert record["accuracy"] == reference["accuracy"]
    assert record["train_stats"]["loss_last"] == reference["train_stats"]["loss_last"]


def test_records_carry_hashes_of_their_config_and_inputs(tiny_config, tiny_checkpoint, toy_dataset, tmp_path):
    hp = {**FAST, "iterations": 2}
    a = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "a", "lora", hp)
    b = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "b", "lora", hp)
    c = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "c", "lora", {**hp, "rank": 2})
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]
    assert a["inputs_hash"] == c["inputs_hash"]
    assert set(a["inputs"]) == {"fewshot", "pretrained"}


def test_non_positive_shots_and_a_missing_image_folder_are_named(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    with pytest.raises(ValueError, match="shots must be a positive integer, got 0"):
        _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", FAST, shots=0)
    _, fewshot = toy_dataset
    with pytest.raises(FileNotFoundError, match=r"image folder .*nowhere of dataset toy does not exist"):
        run_experiment(
            method="lora", dataset="toy", fewshot=fewshot, image_root=tmp_path / "nowhere", shots=1, seed=1,
            backbone=tiny_config, pretrained=str(tiny_checkpoint), record=tmp_path / "r.json",
            state=tmp_path / "a.safetensors", device="cpu", template="{}",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("setting", "backend", "expected"),
    [
        (False, "inductor", None),
        (True, "inductor", {"backend": "inductor", "mode": "default", "dynamic": False}),
        ("reduce-overhead", "inductor", {"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}),
        (True, "cudagraphs", {"backend": "cudagraphs", "dynamic": False}),
    ],
)
def test_compile_settings_become_torch_compile_options(setting, backend, expected):
    assert compile_options(setting, backend) == expected


@pytest.mark.parametrize(
    ("setting", "backend", "message"),
    [
        ("fastest", "inductor", "unknown compile setting 'fastest'"),
        (True, "nope", "unknown compile_backend 'nope'"),
        ("max-autotune", "aot_eager", "'max-autotune' is an inductor mode"),
    ],
)
def test_a_bad_compile_setting_is_named(setting, backend, message):
    with pytest.raises(ValueError, match=message):
        compile_options(setting, backend)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_a_compiled_training_step_trains_as_the_eager_one(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, backend
):
    """The compiled loss (traced, autocast inside, a second batch size at each epoch's end) trains alike."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    hp = {**FAST, "iterations": 8, "batch_size": 20, "blocks": 4}  # 48 images: batches of 20, 20, 8
    eager = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "eager", "blocklora", hp)
    compiled = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "compiled", "blocklora",
        {**hp, "compile": True, "compile_backend": backend},
    )  # fmt: skip
    assert compiled["hparams"]["compile"] is True
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 2  # traced: batches of 20 and 8
    for key in ("loss_first", "loss_last"):
        assert compiled["train_stats"][key] == pytest.approx(eager["train_stats"][key], rel=1e-4)
    assert compiled["accuracy"] == eager["accuracy"]


def test_a_bad_compile_setting_stops_the_run_before_it_starts(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    with pytest.raises(ValueError, match="unknown compile setting"):
        _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", {**FAST, "compile": "fastest"})
    assert not (tmp_path / "lora.json").exists()


def _recorded_losses(monkeypatch) -> list[float]:
    """The loss of every training step, in order, as the loop sees it."""
    seen: list[float] = []
    original = TrainStep.__call__

    def recorded(self, images, labels):
        loss = original(self, images, labels)
        seen.append(float(loss))
        return loss

    monkeypatch.setattr(TrainStep, "__call__", recorded)
    return seen


def test_the_loop_logs_each_windows_mean_loss_and_the_last_one(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch, caplog
):
    losses = _recorded_losses(monkeypatch)
    caplog.set_level(logging.INFO, logger="blocklora")
    started = time.perf_counter()
    record = _run(
        tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", {**FAST, "iterations": 7, "log_every": 3}
    )
    elapsed = time.perf_counter() - started
    logged = re.findall(r"iteration (\d+)/7 loss (\S+)", caplog.text)
    assert [int(done) for done, _ in logged] == [3, 6, 7]  # every 3rd iteration, and the last
    windows = [losses[0:3], losses[3:6], losses[4:7]]  # the last log_every losses at each
    assert [float(v) for _, v in logged] == pytest.approx([statistics.mean(w) for w in windows], abs=1e-4)
    stats = record["train_stats"]
    assert stats["loss_first"] == pytest.approx(statistics.mean(losses[:3]), rel=1e-5)
    assert stats["loss_last"] == pytest.approx(statistics.mean(losses[-3:]), rel=1e-5)
    assert 0 < record["train_seconds"] < elapsed


def test_log_every_0_logs_every_iteration(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, caplog, monkeypatch
):
    losses = _recorded_losses(monkeypatch)
    caplog.set_level(logging.INFO, logger="blocklora")
    hp = {**FAST, "iterations": 3, "log_every": 0}
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", hp)
    assert re.findall(r"iteration (\d)/3 loss", caplog.text) == ["1", "2", "3"]
    stats = record["train_stats"]
    assert (stats["loss_first"], stats["loss_last"]) == (pytest.approx(losses[0]), pytest.approx(losses[-1]))


def test_a_progress_bar_replaces_the_log_lines(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, caplog, capsys
):
    caplog.set_level(logging.INFO, logger="blocklora")
    hp = {**FAST, "iterations": 4, "log_every": 2}
    _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", hp, progress=True)
    bar = capsys.readouterr().err
    assert "lora toy 12-shot" in bar and "4/4" in bar
    assert "iteration 4/4" not in caplog.text
    _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path / "quiet", "lora", hp)
    assert "4/4" not in capsys.readouterr().err
    assert "iteration 4/4" in caplog.text


def test_checkpoint_every_0_writes_no_checkpoint(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch
):
    saved = []
    monkeypatch.setattr(train, "save_checkpoint", lambda path, **state: saved.append(path))
    record = _run(
        tiny_config,
        tiny_checkpoint,
        toy_dataset,
        tmp_path,
        "lora",
        {**FAST, "iterations": 4, "checkpoint_every": 0},
    )
    assert record["iterations"] == 4 and saved == []


def test_a_run_without_a_checkpoint_path_trains(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch
):
    """A method trained from the library, with no checkpoint file: checkpointing is off, not an error."""
    monkeypatch.setattr(experiment, "checkpoint_path", lambda record: None)
    record = _run(
        tiny_config,
        tiny_checkpoint,
        toy_dataset,
        tmp_path,
        "lora",
        {**FAST, "iterations": 4, "checkpoint_every": 2},
    )
    assert record["train_stats"]["resumed_from"] == 0 and not list(tmp_path.glob("*.pt"))


def test_a_checkpoint_of_other_images_with_the_same_labels_is_ignored(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    images, fewshot = toy_dataset
    splits = json.loads(fewshot.read_text())
    by_label: dict[int, list] = {}
    for entry in splits["train"]:
        by_label.setdefault(entry[1], []).append(entry)
    shifted = [
        e for entries in by_label.values() for e in entries[1:] + entries[:1]
    ]  # same labels, other images
    assert [e[1] for e in shifted] == [e[1] for e in splits["train"]] and shifted != splits["train"]
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**splits, "train": shifted}))

    hp = {**FAST, "iterations": 10, "checkpoint_every": 5}
    _run_killed_at(8, tiny_config, tiny_checkpoint, (images, fewshot), tmp_path / "run", "lora", hp)
    assert (tmp_path / "run" / "lora.checkpoint.pt").exists()
    record = _run(tiny_config, tiny_checkpoint, (images, other), tmp_path / "run", "lora", hp)
    assert record["train_stats"]["resumed_from"] == 0


def test_cosine_schedule_warms_up_then_anneals_over_what_is_left():
    lr = functools.partial(cosine_lr, total=10, base=1.0, eta_min=0.1, warmup=2, warmup_lr=0.01)
    assert [lr(0), lr(1)] == [0.01, 0.01]
    assert lr(2) == pytest.approx(1.0)  # the cosine starts after the warm-up ...
    assert lr(6) == pytest.approx(0.55)  # ... is half-way at half of the 8 steps left ...
    assert lr(10) == pytest.approx(0.1)  # ... and ends at eta_min
    assert cosine_lr(3, total=3, base=1.0, eta_min=0.1, warmup=3, warmup_lr=0.01) == pytest.approx(1.0)
    assert cosine_lr(3, total=3, base=1.0, eta_min=0.1, warmup=2, warmup_lr=0.01) == pytest.approx(0.1)
    with pytest.raises(TypeError):
        cosine_lr(0, 10, 1.0, 0.1, 2, 0.01)  # keyword-only: no mixing up total, base and eta_min


def test_the_optimizer_is_adamw_adam_or_sgd_with_its_settings():
    params = [torch.nn.Parameter(torch.zeros(2))]
    hp = {"lr": 0.1, "betas": [0.8, 0.9], "eps": 1e-6, "weight_decay": 0.01, "momentum": 0.7}
    adamw = make_optimizer(params, {**hp, "optimizer": "adamw"})
    assert isinstance(adamw, torch.optim.AdamW) and adamw.defaults["betas"] == (0.8, 0.9)
    adam = make_optimizer(params, {**hp, "optimizer": "adam"})  # Dassl's: weight decay as an L2 term
    assert type(adam) is torch.optim.Adam and adam.defaults["weight_decay"] == 0.01
    assert not adam.defaults["decoupled_weight_decay"]
    sgd = make_optimizer(params, {**hp, "optimizer": "sgd"})
    assert type(sgd) is torch.optim.SGD and sgd.defaults["momentum"] == 0.7
    with pytest.raises(ValueError, match="unknown optimizer 'lamb': use adamw, adam or sgd"):
        make_optimizer(params, {**hp, "optimizer": "lamb"})


def test_the_batch_sampler_draws_every_image_once_per_pass():
    sampler = BatchSampler(5, 2, torch.Generator().manual_seed(0))
    first = [sampler.next() for _ in range(3)]
    assert [len(b) for b in first] == [2, 2, 1]  # the last batch of a pass is kept whole
    assert sorted(i for b in first for i in b) == [0, 1, 2, 3, 4]
    assert BatchSampler(1, 4, torch.Generator()).next() == [0]  # one shot of one class
    with pytest.raises(ValueError, match="the few-shot training set is empty"):
        BatchSampler(0, 4, torch.Generator())


@pytest.mark.parametrize(("n", "batch"), [(5, 2), (7, 7), (3, 4)])
def test_dropping_the_last_batch_leaves_out_what_does_not_fill_one(n, batch):
    sampler = BatchSampler(n, batch, torch.Generator().manual_seed(0), drop_last=True)
    per_epoch = n // batch if n >= batch else 1
    epochs = [[sampler.next() for _ in range(per_epoch)] for _ in range(4)]
    for batches in epochs:
        assert [len(b) for b in batches] == [min(batch, n)] * per_epoch
        drawn = [i for b in batches for i in b]
        assert len(set(drawn)) == len(drawn)  # no image twice in an epoch
    assert len({tuple(i for b in batches for i in b) for batches in epochs}) > 1  # a new draw each epoch


class _ConstantWarmup(torch.optim.lr_scheduler.LRScheduler):
    """Dassl's ConstantWarmupScheduler (dassl/optim/lr_scheduler.py), written out again."""

    def __init__(self, optimizer, successor, warmup_epoch, cons_lr):
        self.successor, self.warmup_epoch, self.cons_lr = successor, warmup_epoch, cons_lr
        super().__init__(optimizer)

    def step(self, epoch=None):
        if self.last_epoch >= self.warmup_epoch:
            self.successor.step(epoch)
            self._last_lr = self.successor.get_last_lr()
        else:
            super().step(epoch)

    def get_lr(self):
        if self.last_epoch >= self.warmup_epoch:
            return self.successor.get_last_lr()
        return [self.cons_lr for _ in self.base_lrs]


def _dassl_rates(
    images: int, batch: int, epochs: int, warmup: int, lr: float, warmup_lr: float
) -> list[float]:
    """The learning rate of every step of Dassl's TrainerX: its loader's batches (drop_last once the set
    holds a full batch), build_lr_scheduler's cosine after a constant warm-up, stepped after each epoch."""
    loader = torch.utils.data.DataLoader(
        range(images), batch_size=batch, shuffle=True, drop_last=images >= batch
    )
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, float(epochs))
    scheduler = _ConstantWarmup(optimizer, cosine, warmup, warmup_lr) if warmup > 0 else cosine
    rates = []
    for _ in range(epochs):
        rates += [optimizer.param_groups[0]["lr"] for _ in loader]
        optimizer.step()  # (no gradient: nothing moves; the order torch expects)
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("images", "batch", "epochs", "warmup"),
    [
        (37, 32, 50, 1),
        (64, 32, 10, 1),
        (400, 32, 200, 1),
        (10, 32, 5, 1),
        (16, 1, 10, 1),
        (100, 256, 7, 2),
        (65, 8, 4, 0),
    ],
)
def test_the_dassl_schedule_takes_dassls_steps_at_dassls_learning_rates(images, batch, epochs, warmup):
    hp = {"batch_size": batch, "lr": 0.002, "eta_min": 0.0, "warmup_epochs": warmup, "warmup_lr": 1e-5}
    schedule = train.Schedule.dassl(epochs, images, hp)
    expected = _dassl_rates(images, batch, epochs, warmup, 0.002, 1e-5)
    assert schedule.total == len(expected)
    assert [schedule.lr(step) for step in range(schedule.total)] == pytest.approx(
        expected, rel=1e-12, abs=1e-15
    )


def test_the_dassl_schedule_halves_the_steps_of_keeping_the_last_batch():
    """The counts CoOp's official runs take: e.g. 1-shot OxfordPets (37 images, 50 epochs) and 8-shot
    EuroSAT (80 images, 200 epochs)."""
    hp = {"batch_size": 32, "lr": 0.002, "eta_min": 0.0, "warmup_epochs": 1, "warmup_lr": 1e-5}
    assert train.Schedule.dassl(50, 37, hp).total == 50  # keeping the last batch: 100
    assert train.Schedule.dassl(100, 40, hp).total == 100  # 4-shot EuroSAT: 200
    assert train.Schedule.dassl(200, 80, hp).total == 400  # 8-shot EuroSAT: 600


def test_flops_are_counted_on_the_eager_step_when_training_compiles(
    tiny_config, tiny_checkpoint, toy_dataset
):
    """forward_backward runs eagerly even when the method compiles its loss (what FLOP counting needs)."""
    images, fewshot = toy_dataset
    splits = json.loads(fewshot.read_text())
    task = FewShotTask(
        dataset="toy", classnames=["red", "green", "blue", "yellow"], template="a photo of a {}.",
        train=splits["train"], val=splits["val"], test=splits["test"], image_root=images, shots=12, seed=1,
    )  # fmt: skip
    method_cls, hp = configured_method(
        "lora", overrides={**FAST, "compile": True, "compile_backend": "aot_eager"}
    )
    method, run, _ = build_run(
        method_cls, hp, task,
        backbone=tiny_config, pretrained=str(tiny_checkpoint), device="cpu", seed=1,
    )  # fmt: skip
    step = TrainStep(method, run.precision(method.hp), run.device)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step.forward_backward(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert not torch._dynamo.utils.counters["stats"]["calls_captured"]  # nothing traced
    step(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    assert torch._dynamo.utils.counters["stats"]["calls_captured"]  # the training step is


def test_a_dassl_method_trains_its_schedules_steps_at_its_rates(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch
):
    rates: list[float] = []
    sizes: list[int] = []
    original = TrainStep.__call__

    def recorded(self, images, labels):
        rates.append(self.optimizer.param_groups[0]["lr"])
        sizes.append(len(labels))
        return original(self, images, labels)

    monkeypatch.setattr(TrainStep, "__call__", recorded)
    hp = {"epochs": 4, "batch_size": 20, "lr": 0.01, "warmup_lr": 1e-4}
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "coop", hp)
    assert sizes == [20, 20] * 4  # 48 images: two full batches an epoch, the 8 left over dropped
    assert rates == pytest.approx(_dassl_rates(48, 20, 4, 1, 0.01, 1e-4))
    assert record["iterations"] == 8
    stats = record["train_stats"]
    assert (stats["schedule"], stats["epochs"], stats["steps_per_epoch"], stats["drop_last"]) == (
        "dassl",
        4,
        2,
        True,
    )


def test_every_step_runs_at_the_scheduled_learning_rate(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, monkeypatch
):
    rates: list[float] = []
    original = TrainStep.__call__

    def recorded(self, images, labels):
        rates.append(self.optimizer.param_groups[0]["lr"])
        return original(self, images, labels)

    monkeypatch.setattr(TrainStep, "__call__", recorded)
    hp = {**FAST, "iterations": 6, "lr": 0.01, "eta_min": 0.001, "warmup_iterations": 2, "warmup_lr": 0.0001}
    _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", hp)
    expected = [cosine_lr(i, total=6, base=0.01, eta_min=0.001, warmup=2, warmup_lr=0.0001) for i in range(6)]
    assert rates == pytest.approx(expected)


def test_an_unreadable_checkpoint_is_named_and_the_run_starts_at_0(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, caplog
):
    (tmp_path / "lora.checkpoint.pt").write_bytes(b"not a checkpoint")
    record = _run(
        tiny_config,
        tiny_checkpoint,
        toy_dataset,
        tmp_path,
        "lora",
        {**FAST, "iterations": 4, "checkpoint_every": 2},
    )
    assert record["train_stats"]["resumed_from"] == 0
    assert f"ignoring unreadable checkpoint {tmp_path / 'lora.checkpoint.pt'}" in caplog.text


def test_checkpoint_every_1_saves_and_resumes_every_iteration(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    hp = {**FAST, "iterations": 4, "checkpoint_every": 1}
    _run_killed_at(3, tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", hp)
    assert (
        _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", hp)["train_stats"]["resumed_from"]
        == 2
    )


def test_zero_iterations_train_nothing_and_report_no_loss(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path
):
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "lora", {**FAST, "iterations": 0})
    assert record["iterations"] == 0
    assert record["train_stats"]["loss_first"] is None and record["train_stats"]["loss_last"] is None


def test_max_iterations_cuts_a_dassl_schedule_and_keeps_each_steps_rate():
    hp = {"batch_size": 8, "lr": 0.002, "eta_min": 0.0, "warmup_epochs": 1, "warmup_lr": 1e-5}
    full = train.Schedule.dassl(3, 40, hp)
    cut = train.Schedule.dassl(3, 40, {**hp, "max_iterations": 7})
    assert (full.total, cut.total, cut.epochs) == (15, 7, 3)
    assert [cut.lr(step) for step in range(7)] == [full.lr(step) for step in range(7)]
    assert train.Schedule.dassl(3, 40, {**hp, "max_iterations": 100}).total == 15


class _Payload:
    """What a planted checkpoint may hold: unpickling it runs code (here: writes the uid it runs as)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"import os; open({self.marker!r}, 'w').write(str(os.getuid()))",))


def _plant(path, data: bytes) -> None:
    """Write ``data`` at ``path`` as another user (uid 12345) where the test runs as root, as a member
    of a group-writable results folder would; as this user elsewhere."""
    import os
    import shutil
    import subprocess

    if os.geteuid() == 0 and shutil.which("setpriv") and os.access("/usr/bin/python3", os.X_OK):
        script = "import sys; open(sys.argv[1], 'wb').write(sys.stdin.buffer.read())"
        subprocess.run(
            ["setpriv", "--reuid=12345", "--regid=12345", "--clear-groups", "/usr/bin/python3", "-c", script, str(path)],
            input=data, check=True,
        )  # fmt: skip
    else:
        path.write_bytes(data)


@pytest.fixture
def shared_results():
    """A results folder others may write to (group-writable by design; world-writable here)."""
    from tests.conftest import folder_others_reach

    with folder_others_reach(0o777) as folder:
        yield folder


@pytest.mark.parametrize("pickled", ["plain pickle", "torch.save"])
def test_a_checkpoint_planted_in_a_shared_results_folder_runs_no_code(
    tiny_config, tiny_checkpoint, toy_dataset, shared_results, tmp_path, caplog, pickled
):
    import io
    import pickle

    marker = tmp_path / "code-ran"
    hp = {**FAST, "iterations": 4, "checkpoint_every": 2}
    state = {"fingerprint": {"method": "lora"}, "step": 2, "payload": _Payload(marker)}
    if pickled == "torch.save":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    else:
        data = pickle.dumps(_Payload(marker))
    _plant(shared_results / "lora.checkpoint.pt", data)
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, shared_results, "lora", hp)
    assert not marker.exists(), f"the planted checkpoint ran code as uid {marker.read_text()}"
    assert record["train_stats"]["resumed_from"] == 0
    assert f"ignoring checkpoint {shared_results / 'lora.checkpoint.pt'}" in caplog.text or (
        f"ignoring unreadable checkpoint {shared_results / 'lora.checkpoint.pt'}" in caplog.text
    )


def test_a_checkpoint_whose_tensors_do_not_fit_is_not_broadcast_into_the_model(
    tiny_config, tiny_checkpoint, toy_dataset, tmp_path, caplog
):
    """A (4,) tensor would broadcast silently into a (4, 16) parameter: the shape must be exact."""
    hp = {**FAST, "iterations": 20, "checkpoint_every": 5, "blocks": 4}
    _run_killed_at(13, tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "blocklora", hp)
    path = tmp_path / "blocklora.checkpoint.pt"
    state = torch.load(path, weights_only=False)  # this test's own file
    state["params"] = [p[0].clone() for p in state["params"]]  # each parameter's first row only
    torch.save(state, path)
    record = _run(tiny_config, tiny_checkpoint, toy_dataset, tmp_path, "blocklora", hp)
    assert record["train_stats"]["resumed_from"] == 0
    assert f"ignoring checkpoint {path}: parameter 0 is" in caplog.text


def test_a_checkpoint_holds_only_tensors_and_plain_data(tmp_path):
    from blocklora.train import save_checkpoint

    with pytest.raises(
        TypeError, match=r"checkpoint\['extra'\]\[1\] is a PosixPath: a checkpoint holds only"
    ):
        save_checkpoint(tmp_path / "c.pt", extra=[1, tmp_path])
    assert not (tmp_path / "c.pt").exists()
