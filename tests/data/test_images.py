"""Tests of image decoding, resizing, cropping and normalisation."""

import numpy as np
import pytest
from PIL import Image

from openvlm_jax.data import images

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)


def test_normalisation_of_a_solid_image(tmp_path):
  path = str(tmp_path / 'solid.png')
  Image.new('RGB', (40, 20), (255, 102, 0)).save(path)
  pixels = images.load_image(path, image_size=16, image_mean=MEAN, image_std=STD)
  assert pixels.shape == (16, 16, 3) and pixels.dtype == np.float32
  expected = (np.array([1.0, 0.4, 0.0]) - np.array(MEAN)) / np.array(STD)
  np.testing.assert_allclose(pixels, np.broadcast_to(expected, (16, 16, 3)), atol=1e-6)


def test_wide_image_is_center_cropped_and_grayscale_becomes_rgb(tmp_path):
  path = str(tmp_path / 'stripes.png')
  gray = np.zeros((8, 24), dtype=np.uint8)
  gray[:, 8:16] = 255  # a white center third on black
  Image.fromarray(gray).save(path)
  pixels = images.load_image(path, image_size=8, image_mean=(0.0,) * 3, image_std=(1.0,) * 3)
  np.testing.assert_allclose(pixels, np.ones((8, 8, 3)), atol=1e-6)


def test_bytes_and_file_agree(tmp_path):
  path = str(tmp_path / 'a.png')
  Image.fromarray(np.arange(64 * 3, dtype=np.uint8).reshape(8, 8, 3)).save(path)
  kwargs = {'image_size': 8, 'image_mean': MEAN, 'image_std': STD}
  with open(path, 'rb') as f:
    from_bytes = images.load_image(f.read(), **kwargs)
  np.testing.assert_array_equal(from_bytes, images.load_image(path, **kwargs))


def test_corrupt_and_missing_files_are_named(tmp_path):
  corrupt = tmp_path / 'corrupt.png'
  corrupt.write_bytes(b'\x89PNG\r\n\x1a\nnot really a png')
  kwargs = {'image_size': 8, 'image_mean': MEAN, 'image_std': STD}
  with pytest.raises(ValueError, match='cannot decode image .*corrupt.png'):
    images.load_image(str(corrupt), **kwargs)
  with pytest.raises(ValueError, match='cannot decode image .*corrupt.png'):
    images.verify_image(str(corrupt))
  with pytest.raises(ValueError, match='image not found: .*missing.png'):
    images.load_image(str(tmp_path / 'missing.png'), **kwargs)
  with pytest.raises(ValueError, match='image not found: .*missing.png'):
    images.verify_image(str(tmp_path / 'missing.png'))
