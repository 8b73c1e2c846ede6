"""The CIFAR-10-C-style corruptions (transferlab.data.corruptions): each one on sample images.

What is checked per corruption: uint8 of the input's shape, the input untouched, the same result
twice, a visible change at every severity, severities that grow (where the published parameters make
them grow), a result that depends on the seed only where the corruption draws random numbers, and an
image's result independent of the other images in its batch. The deterministic corruptions are also
held against a plain numpy / PIL / scipy transcription of the reference code (make_cifar_c.py).
"""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from transferlab.data import corruptions
from transferlab.data.corruptions import CORRUPTIONS, OMITTED, SEVERITIES, STOCHASTIC, corrupt

# glass_blur's published severities 1-3 only raise the pre-blur sigma (same moves), and
# elastic_transform's shrink the affine jitter as they grow the elastic part: their mean pixel change
# is not monotone in the severity in the reference either.
NOT_MONOTONE = {"glass_blur", "elastic_transform"}


def _sample_images(n: int = 12, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images with structure (smooth gradients, edges, a flat patch), not only noise: a blur or a
    JPEG pass of pure noise would tell little."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for i in range(n):
        base = torch.stack(
            [
                (xs * (4 + i) + ys * 3) % 256,
                (ys * (5 + i)) % 256,
                ((xs // 8 + ys // 8) % 2) * 200 + 20,
            ]
        ).float()
        base += torch.randn(3, size, size, generator=g) * 12
        base[:, 4:12, 4:12] = 128  # a flat patch
        images.append(base.clamp(0, 255).to(torch.uint8))
    return torch.stack(images)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _sample_images()


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_corruption_is_a_deterministic_uint8_change_that_leaves_its_input_alone(images, name):
    before = images.clone()
    changes = []
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=0)
        assert out.dtype == torch.uint8 and out.shape == images.shape
        assert torch.equal(images, before), "the input was modified"
        assert torch.equal(out, corrupt(images, name, severity, seed=0)), "not deterministic"
        change = (out.float() - images.float()).abs().mean().item()
        assert change > 0.5, f"{name} severity {severity} barely changes the images ({change:.2f} levels)"
        changes.append(change)
    if name not in NOT_MONOTONE:
        # the worst severity changes the images more than the mildest
        assert changes[-1] > changes[0], (
            f"{name}: severity 5 changes {changes[-1]:.2f}, severity 1 {changes[0]:.2f}"
        )


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_the_seed_matters_exactly_for_the_random_corruptions(images, name):
    a = corrupt(images, name, 3, seed=0)
    b = corrupt(images, name, 3, seed=1)
    assert torch.equal(a, b) == (name not in STOCHASTIC)


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_an_images_corruption_does_not_depend_on_its_batch(images, name):
    whole = corrupt(images, name, 4, seed=7)
    alone = corrupt(images[5:6], name, 4, seed=7)
    shuffled = corrupt(images.flip(0), name, 4, seed=7).flip(0)
    assert torch.equal(whole[5:6], alone)
    assert torch.equal(whole, shuffled)
    # the draws come from the image itself, not from its place in the batch
    twins = corrupt(torch.stack([images[0], images[0]]), name, 4, seed=7)
    assert torch.equal(twins[0], twins[1]), "identical images get the identical corruption"


def _numpy(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()  # HWC, as the reference reads PIL images


def _back(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_contrast_is_the_reference_formula(images, severity):
    c = [0.75, 0.5, 0.4, 0.3, 0.15][severity - 1]
    x = _numpy(images) / 255.0
    means = x.mean(axis=(1, 2), keepdims=True)
    expected = (np.clip((x - means) * c + means, 0, 1) * 255).astype(np.uint8)
    got = _numpy(corrupt(images, "contrast", severity, 0)).astype(int)
    # float32 here, float64 there: a value on an integer boundary may truncate one level lower
    assert np.abs(got - expected.astype(int)).max() <= 1
    assert (got == expected).mean() > 0.99


@pytest.mark.parametrize("severity", [1, 5])
def test_brightness_raises_the_hsv_value_as_the_reference_does(severity):
    c = [0.05, 0.1, 0.15, 0.2, 0.3][severity - 1]
    images = _sample_images(n=2, size=8)
    images[0, :, 0, 0] = 0  # a black pixel: no hue, becomes grey
    got = _numpy(corrupt(images, "brightness", severity, 0)).astype(int)
    x = _numpy(images) / 255.0
    for n, i, j in np.ndindex(*x.shape[:3]):
        h, s, v = colorsys.rgb_to_hsv(*x[n, i, j])
        rgb = np.clip(colorsys.hsv_to_rgb(h, s, min(v + c, 1.0)), 0, 1) * 255
        assert np.abs(got[n, i, j] - rgb.astype(np.uint8).astype(int)).max() <= 1, (n, i, j)


@pytest.mark.parametrize("severity", SEVERITIES)
def test_pixelate_is_pils_box_resize_down_and_up_to_the_bit(images, severity):
    c = [0.95, 0.9, 0.85, 0.75, 0.65][severity - 1]
    expected = []
    for image in _numpy(images):
        pil = Image.fromarray(image)
        pil = pil.resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
        expected.append(np.asarray(pil))
    assert torch.equal(corrupt(images, "pixelate", severity, 0), _back(np.stack(expected)))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_zoom_blur_is_the_reference_clipped_zoom_average(images, severity):
    from scipy.ndimage import zoom as scizoom

    def clipped_zoom(img, zoom_factor):  # make_cifar_c.py's, for square images
        h = img.shape[0]
        ch = int(np.ceil(h / zoom_factor))
        top = (h - ch) // 2
        img = scizoom(img[top : top + ch, top : top + ch], (zoom_factor, zoom_factor, 1), order=1)
        trim_top = (img.shape[0] - h) // 2
        return img[trim_top : trim_top + h, trim_top : trim_top + h]

    zooms = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1], 0.01)
    expected = []
    for image in _numpy(images):
        x = image / 255.0
        out = np.zeros_like(x)
        for z in zooms:
            out += clipped_zoom(x, z)
        expected.append((np.clip((x + out) / (len(zooms) + 1), 0, 1) * 255).astype(np.uint8))
    got = _numpy(corrupt(images, "zoom_blur", severity, 0)).astype(int)
    diff = np.abs(got - np.stack(expected).astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98


def test_gaussian_noise_has_the_published_standard_deviation():
    grey = torch.full((64, 3, 32, 32), 128, dtype=torch.uint8)  # far from the clipping bounds
    for severity, std in zip(SEVERITIES, [0.04, 0.06, 0.08, 0.09, 0.10]):
        noise = corrupt(grey, "gaussian_noise", severity, 0).float() - 128
        assert abs(noise.std().item() - std * 255) < 0.05 * std * 255
        assert abs(noise.mean().item()) < 1.0  # truncation moves the mean by half a level


def test_jpeg_compression_loses_more_at_lower_quality(images):
    errors = [
        (corrupt(images, "jpeg_compression", s, 0).float() - images.float()).pow(2).mean() for s in SEVERITIES
    ]
    assert errors == sorted(errors)


def test_an_empty_batch_and_a_larger_image_are_accepted():
    assert corrupt(torch.zeros(0, 3, 32, 32, dtype=torch.uint8), "fog", 1, 0).shape == (0, 3, 32, 32)
    big = _sample_images(n=2, size=40)
    assert corrupt(big, "defocus_blur", 2, 0).shape == big.shape


@pytest.mark.parametrize(
    "name, severity, seed, error, words",
    [
        ("frost", 1, 0, ValueError, "not implemented: it blends"),
        ("gaussian", 1, 0, ValueError, "unknown corruption 'gaussian'"),
        (None, 1, 0, ValueError, "unknown corruption None"),
        ("fog", 0, 0, ValueError, "severity must be an int in 1..5"),
        ("fog", 6, 0, ValueError, "severity must be an int in 1..5"),
        ("fog", 2.5, 0, ValueError, "severity must be an int in 1..5"),
        ("fog", "3", 0, ValueError, "severity must be an int in 1..5"),
        ("fog", True, 0, ValueError, "severity must be an int in 1..5"),
        ("fog", 3, 0.5, TypeError, "seed must be an int"),
    ],
)
def test_bad_arguments_are_refused_by_name(images, name, severity, seed, error, words):
    with pytest.raises(error, match=words):
        corrupt(images, name, severity, seed)


@pytest.mark.parametrize(
    "bad, words",
    [
        (torch.zeros(2, 3, 32, 32), "must be uint8"),
        (torch.zeros(2, 1, 32, 32, dtype=torch.uint8), "must be uint8 \\(N, 3, H, W\\)"),
        (torch.zeros(3, 32, 32, dtype=torch.uint8), "must be uint8 \\(N, 3, H, W\\)"),
        (torch.zeros(2, 3, 4, 32, dtype=torch.uint8), "at least 8x8"),
        (np.zeros((2, 3, 32, 32), dtype=np.uint8), "must be a torch.Tensor"),
    ],
)
def test_bad_images_are_refused(bad, words):
    with pytest.raises((TypeError, ValueError), match=words):
        corrupt(bad, "contrast", 1, 0)


def test_the_omitted_corruption_is_named_and_not_listed():
    assert set(OMITTED) == {"frost"} and not set(OMITTED) & set(CORRUPTIONS)
    assert len(CORRUPTIONS) + len(OMITTED) == 15  # the 15 of Hendrycks & Dietterich
    assert isinstance(corruptions.VERSION, int)
