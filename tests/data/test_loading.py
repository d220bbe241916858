import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from blocklora.data.loading import (
    DeviceAugment,
    ImageList,
    ImageReadError,
    decode_uint8,
    eval_transform,
    read_image,
    resize_weights,
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


@pytest.mark.parametrize("size", [7, 24])
def test_resize_weights_equal_antialiased_bicubic_interpolation(size):
    """Each weight row is what F.interpolate(bicubic, antialias) gives that window, up or down."""
    generator = torch.Generator().manual_seed(0)
    extent = 60
    for length in [1, 2, 5, size - 1, size, size + 1, 2 * size + 3, extent]:
        for offset in {0, extent - length, (extent - length) // 3}:
            signal = torch.rand(extent, generator=generator) * 255
            expected = F.interpolate(
                signal[None, None, None, offset : offset + length],
                size=(1, size),
                mode="bicubic",
                align_corners=False,
                antialias=True,
            ).flatten()
            weights = resize_weights(torch.tensor([offset]), torch.tensor([length]), size, extent)[0]
            assert weights.shape == (size, extent)
            assert not weights[:, :offset].any() and not weights[:, offset + length :].any()
            torch.testing.assert_close(weights @ signal, expected, atol=1e-3, rtol=1e-5)


def _per_crop_reference(augment, images, indices):
    """The transform written out: the boxes and flips a same-seeded augment draws, F.interpolate each."""
    flips = torch.rand(len(indices), generator=augment.generator) < 0.5
    crops = []
    for n, index in enumerate(indices):
        img = images[index]
        i, j, h, w = augment._box(img.shape[1], img.shape[2])
        crop = F.interpolate(
            img[None, :, i : i + h, j : j + w].float(),
            size=(augment.size, augment.size),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        )
        crops.append(crop.flip(-1) if flips[n] else crop)
    return (torch.cat(crops).clamp(0, 255) / 255 - augment.mean) / augment.std


@pytest.mark.parametrize(
    ("batched", "same_size", "max_chunk_elements"),
    [
        (False, False, 1 << 26),
        (True, True, 1 << 26),
        (True, True, 3 * 40 * 40),
        (True, False, 1 << 26),
        (True, False, 3 * 40 * 40),
    ],
)
def test_augment_equals_the_transform_cropping_one_image_at_a_time(batched, same_size, max_chunk_elements):
    generator = torch.Generator().manual_seed(3)
    shapes = [(37, 53)] * 5 if same_size else [(37, 53), (90, 20), (16, 16), (120, 75), (41, 41)]
    images = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=generator) for h, w in shapes]

    def make(seed):
        return DeviceAugment(images, 24, MEAN, STD, device=torch.device("cpu"), scale=(0.05, 1.0),
                             generator=torch.Generator().manual_seed(seed), batched=batched,
                             max_chunk_elements=max_chunk_elements)  # fmt: skip

    augment, reference = make(11), make(11)
    assert (augment.stacked is not None) == (batched and same_size)
    if augment.stacked is not None:  # the images are views of the stack, not a second copy
        assert all(img.untyped_storage().data_ptr() == augment.stacked.untyped_storage().data_ptr()
                   for img in augment.images)  # fmt: skip
    if batched and not same_size and max_chunk_elements < 1 << 20:
        boxes = [(0, 0, h, w) for h, w in shapes]
        assert len(augment._chunks(boxes)) > 1  # the small budget does split the batch
    indices = [0, 1, 2, 3, 4, 3, 2, 1, 0, 4, 4, 0]
    for _ in range(3):  # several batches: the generator advances identically
        got = augment(indices)
        want = _per_crop_reference(reference, images, indices)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_augment_is_batched_by_default_only_on_cuda():
    images = [torch.zeros(3, 8, 8, dtype=torch.uint8)]
    assert not DeviceAugment(images, 4, MEAN, STD, device=torch.device("cpu")).batched
    assert DeviceAugment(images, 4, MEAN, STD, device=torch.device("cpu"), batched=True).batched
