"""Image decoding and preprocessing for the vision tower (Pillow + numpy only)."""

import contextlib
import io
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image


def preprocess_image(
    image: Image.Image,
    *,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> np.ndarray:
  """Resizes, center-crops and normalises a Pillow image, as CLIP's image processor does.

  The shortest side is resized to `image_size` (bicubic), the center square is cropped, pixel
  values are scaled to [0, 1] and normalised per channel: (x - mean) / std.

  Returns:
    float32 [image_size, image_size, 3].
  """
  image = image.convert('RGB')
  width, height = image.size
  scale = image_size / min(width, height)
  new_width = max(image_size, round(width * scale))
  new_height = max(image_size, round(height * scale))
  if (new_width, new_height) != (width, height):
    image = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
  left = (new_width - image_size) // 2
  top = (new_height - image_size) // 2
  image = image.crop((left, top, left + image_size, top + image_size))
  pixels = np.asarray(image, dtype=np.float32) / 255.0  # [H, W, 3]
  mean = np.asarray(image_mean, dtype=np.float32)
  std = np.asarray(image_std, dtype=np.float32)
  return (pixels - mean) / std


@contextlib.contextmanager
def _pillow(path_or_bytes: str | bytes) -> Iterator[Image.Image]:
  """An image file (or encoded bytes) opened lazily by Pillow; a missing or undecodable one
  (also while the block reads it) raises ValueError naming the file."""
  name = 'bytes' if isinstance(path_or_bytes, bytes) else path_or_bytes
  try:
    opened = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(opened) as image:
      yield image
  except FileNotFoundError as error:
    raise ValueError(f'image not found: {path_or_bytes}') from error
  except (OSError, SyntaxError, Image.DecompressionBombError) as error:
    raise ValueError(f'cannot decode image {name}: {error}') from error


def open_image(path_or_bytes: str | bytes) -> Image.Image:
  """Reads and decodes an image file (or encoded bytes: PNG, JPEG, ...) with Pillow.

  Raises:
    ValueError: naming the file, if it is missing or cannot be decoded.
  """
  with _pillow(path_or_bytes) as image:
    image.load()  # the pixels stay in memory once the file is closed
    return image


def image_size(path_or_bytes: str | bytes) -> tuple[int, int]:
  """(height, width) of an image from its header, without decoding its pixels.

  Raises:
    ValueError: naming the file, if it is missing or not an image.
  """
  with _pillow(path_or_bytes) as image:
    width, height = image.size
    return height, width


def load_image(
    path: str | bytes,
    *,
    image_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
) -> np.ndarray:
  """Reads an image file (or encoded bytes) and preprocesses it (see `preprocess_image`).

  Returns:
    float32 [image_size, image_size, 3].

  Raises:
    ValueError: naming the file, if it is missing or cannot be decoded.
  """
  return preprocess_image(open_image(path), image_size=image_size, image_mean=image_mean,
                          image_std=image_std)


def verify_image(path: str | bytes, full_decode: bool = False) -> None:
  """Checks that `path` exists and holds a decodable image.

  By default this is Pillow's cheap `verify()` (headers and, for PNG, chunk checksums; a
  truncated JPEG passes it). `full_decode=True` decodes all pixels, which catches everything
  but costs as much as reading the image.

  Args:
    path: an image file, or encoded image bytes.
    full_decode: decode all pixels.

  Raises:
    ValueError: naming the file, if it is missing or corrupt.
  """
  with _pillow(path) as image:
    if full_decode:
      image.load()
    else:
      image.verify()
