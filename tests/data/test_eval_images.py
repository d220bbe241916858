import subprocess
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from blocklora.data import eval_images as module
from blocklora.data.eval_images import eval_images
from blocklora.data.loading import eval_transform, read_image

MEAN, STD = (0.48, 0.45, 0.40), (0.27, 0.26, 0.28)


@pytest.fixture
def pictures(tmp_path):
    """Eight images of different sizes and aspect ratios, as split entries."""
    rng = np.random.default_rng(0)
    entries = []
    for i, (h, w) in enumerate(
        [(40, 60), (64, 48), (33, 33), (100, 37), (20, 90), (48, 48), (57, 71), (90, 64)]
    ):
        path = tmp_path / "images" / f"c{i % 3}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        entries.append([f"c{i % 3}/{i}.png", i % 3, f"class {i % 3}"])
    return tmp_path / "images", entries


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images decoded."""
    calls = []
    original = module.decode

    def counting(entries, *args, **kwargs):
        calls.append(len(entries))
        return original(entries, *args, **kwargs)

    monkeypatch.setattr(module, "decode", counting)
    return calls


def test_batches_are_exactly_the_torchvision_test_transform(pictures, tmp_path):
    root, entries = pictures
    transform = eval_transform(32, MEAN, STD)
    expected = torch.stack([transform(read_image(root / e[0])) for e in entries])
    for cache_dir in (None, tmp_path / "cache"):
        images = eval_images(entries, root, 32, cache_dir=cache_dir, threads=2)
        batches = list(images.batches(3, torch.device("cpu"), MEAN, STD))
        assert [len(b) for b, _ in batches] == [3, 3, 2]
        assert torch.equal(torch.cat([b for b, _ in batches]), expected)  # bit for bit
        assert torch.cat([labels for _, labels in batches]).tolist() == [e[1] for e in entries]


def test_the_cache_is_decoded_once_and_keyed_by_what_the_pixels_depend_on(pictures, tmp_path, decodes):
    root, entries = pictures
    cache = tmp_path / "cache"
    first = eval_images(entries, root, 32, cache_dir=cache)
    assert decodes == [8] and isinstance(first.pixels, np.memmap)
    again = eval_images(entries, root, 32, cache_dir=cache)
    assert decodes == [8] and np.array_equal(again.pixels, first.pixels)
    eval_images(entries, root, 24, cache_dir=cache)  # another size
    eval_images(entries[:5], root, 32, cache_dir=cache)  # other entries
    assert decodes == [8, 8, 5]
    assert len(list((cache / module.SUBDIR).glob("*.npy"))) == 3


def test_two_jobs_asking_at_once_decode_once_and_neither_reads_a_partial_file(
    pictures, tmp_path, monkeypatch
):
    root, entries = pictures
    original, calls = module.decode, []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.5)  # the other job asks while this one decodes
        return original(*args, **kwargs)

    monkeypatch.setattr(module, "decode", slow)
    results = []
    jobs = [
        threading.Thread(target=lambda: results.append(eval_images(entries, root, 32, cache_dir=tmp_path)))
        for _ in range(2)
    ]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert len(calls) == 1 and len(results) == 2
    assert np.array_equal(results[0].pixels, results[1].pixels)


def test_a_truncated_or_foreign_cache_file_is_detected_and_rebuilt(pictures, tmp_path, decodes, caplog):
    root, entries = pictures
    images = eval_images(entries, root, 32, cache_dir=tmp_path)
    path = images.path
    reference = np.array(images.pixels)
    del images
    path.write_bytes(path.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    rebuilt = eval_images(entries, root, 32, cache_dir=tmp_path)
    assert "unreadable" in caplog.text and decodes == [8, 8]
    assert np.array_equal(rebuilt.pixels, reference)
    del rebuilt
    np.save(path, np.zeros((8, 32, 32, 3), dtype=np.float32))  # right shape, wrong content type
    eval_images(entries, root, 32, cache_dir=tmp_path)
    assert "does not match" in caplog.text and decodes == [8, 8, 8]


BUILD = """
import json, sys
from blocklora.data import eval_images as module
entries, root, cache, slow = json.loads(sys.argv[1])
if slow:  # a build that is killed while it decodes
    import time
    module.decode = lambda *args, **kwargs: time.sleep(60)
try:
    module.eval_images(entries, root, 320, cache_dir=cache)
except OSError as exc:
    sys.exit(f"OSError: {exc}")
"""


def _build(entries, root, cache, *, slow=False) -> subprocess.Popen:
    import json
    import sys

    argument = json.dumps([entries, str(root), str(cache), slow])
    return subprocess.Popen(
        [sys.executable, "-c", BUILD, argument], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.fixture
def small_disk(tmp_path):
    """A real 2 MiB filesystem (tmpfs), full long before 8 images of 320x320 (2.4 MB) fit."""
    import os
    import shutil

    folder = tmp_path / "small"
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a small tmpfs (a real full disk)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_while_building_the_cache_is_a_named_error_that_leaves_no_file(pictures, small_disk):
    root, entries = pictures
    job = _build(entries, root, small_disk)
    _, err = job.communicate(timeout=120)
    assert job.returncode == 1, (
        f"killed by signal {-job.returncode} (SIGBUS is 7)" if job.returncode < 0 else err
    )
    assert "no room for the evaluation image cache" in err and "it needs 2.3 MiB" in err
    assert "free space" in err
    assert (
        sorted(p.name for p in (small_disk / module.SUBDIR).iterdir() if not p.name.endswith(".lock")) == []
    )


def test_a_temporary_left_by_a_killed_build_is_removed_by_the_next_build(pictures, tmp_path):
    root, entries = pictures
    cache = tmp_path / "cache"
    job = _build(entries, root, cache, slow=True)
    deadline = time.monotonic() + 60
    while not list((cache / module.SUBDIR).glob(".*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.05)
    job.kill()  # kill -9 mid-build: its temporary (up to ~7.5 GB for ImageNet) stays behind
    job.wait()
    assert list((cache / module.SUBDIR).glob(".*.tmp"))
    eval_images(entries, root, 320, cache_dir=cache)
    assert list((cache / module.SUBDIR).glob(".*.tmp")) == []
