import numpy as np
import pytest
import torch
from PIL import Image

from blocklora.data.loading import (
    DeviceAugment,
    ImageList,
    ImageReadError,
    decode_uint8,
    eval_transform,
    read_image,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _png(path, size=(48, 40), value=200):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def test_a_truncated_image_stops_with_its_path(tmp_path):
    good = _png(tmp_path / "a" / "good.png")
    broken = tmp_path / "a" / "broken.png"
    broken.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ImageReadError, match=r"cannot decode image .*broken\.png"):
        read_image(broken)
    dataset = ImageList(
        [["a/good.png", 0, "x"], ["a/broken.png", 0, "x"]], tmp_path, eval_transform(32, MEAN, STD)
    )
    assert dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(ImageReadError, match=r"broken\.png"):
        dataset[1]


def test_a_missing_image_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(ImageReadError, match=r"image not found: .*nope\.png.*prepare"):
        decode_uint8([["nope.png", 0, "x"]], tmp_path)


def test_device_augment_is_seeded_normalized_and_sized(tmp_path):
    _png(tmp_path / "img.png", size=(64, 48), value=128)
    images = decode_uint8([["img.png", 0, "x"]], tmp_path)
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, 48, 64)

    def batch(seed):
        augment = DeviceAugment(
            images, 32, MEAN, STD, device=torch.device("cpu"), generator=torch.Generator().manual_seed(seed)
        )
        return augment([0, 0, 0, 0])

    a, b = batch(1), batch(1)
    assert a.shape == (4, 3, 32, 32)
    torch.testing.assert_close(a, b)
    # a constant image stays constant whatever the crop: (128/255 - 0.5) / 0.25
    torch.testing.assert_close(a, torch.full_like(a, (128 / 255 - 0.5) / 0.25), atol=1e-3, rtol=0)


def test_device_augment_crops_follow_the_scale_range(tmp_path):
    pixels = np.zeros((100, 100, 3), dtype=np.uint8)
    pixels[:, 50:] = 255  # left half black, right half white
    Image.fromarray(pixels).save(tmp_path / "half.png")
    images = decode_uint8([["half.png", 0, "x"]], tmp_path)
    full = DeviceAugment(images, 20, (0, 0, 0), (1, 1, 1), device=torch.device("cpu"), scale=(1.0, 1.0),
                         ratio=(1.0, 1.0), generator=torch.Generator().manual_seed(0))  # fmt: skip
    out = full([0] * 8)
    # the whole image each time, flipped or not: half the pixels bright
    assert torch.allclose(out.mean(dim=(1, 2, 3)), torch.full((8,), 0.5), atol=0.02)
    flipped = out[:, 0, 10, 2] > 0.5  # bright on the left means flipped
    assert 0 < int(flipped.sum()) < 8
