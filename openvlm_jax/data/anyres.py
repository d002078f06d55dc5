"""High-resolution images as LLaVA-NeXT's "anyres" views (Pillow + numpy only).

An image becomes a base view (the whole image squashed to the tower's square size) plus crops
of that size tiling the image resized onto a grid picked from `image_grid_pinpoints`
(resolutions (height, width)) to fit its aspect ratio, as transformers'
LlavaNextImageProcessor does. Each view goes through the tower like a LLaVA-1.5 image; the
tokens the LLM sees are laid out by `feature_layout`: the base view's features, then the
crops' feature grid with the padding rows or columns removed and an `image_newline`
embedding after each row, as LlavaNextModel.pack_image_features does.

LLaVA-OneVision adds two rules (`max_crops`, its "anyres_max_N"): a crops' grid larger than
about N crops' worth of features is shrunk with bilinear interpolation before the newlines
are added, and the images of a multi-image record are not tiled but padded to a square of the
mean colour and given as one view (followed by one newline).

The layout is an index into the image's view features, so the model only gathers: view v's
feature t is row v * tokens_per_view + t, and NEWLINE marks the newline embedding. With
`max_crops` each token is a weighted sum of four such rows (the bilinear taps).
"""

import dataclasses
import math

from collections.abc import Sequence

import numpy as np
from PIL import Image

from openvlm_jax.data import images as images_lib

NEWLINE = -1  # a `feature_layout` entry that takes the image_newline embedding
BILINEAR_TAPS = 4
Pinpoints = Sequence[Sequence[int]]


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where an image's LLM tokens come from.

  index: int32 [num_tokens] (or [num_tokens, BILINEAR_TAPS] with `max_crops`), rows of the
    image's view features or NEWLINE.
  weight: None, or float32 [num_tokens, BILINEAR_TAPS]: token k is
    sum_j weight[k, j] * row index[k, j].
  """

  index: np.ndarray
  weight: np.ndarray | None = None

  def __len__(self) -> int:
    return len(self.index)


def select_best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
  """The (height, width) of `pinpoints` that keeps most of the image and wastes least.

  An image scaled to fit a resolution keeps min(its scaled area, its own area) pixels; the
  resolution with the most kept pixels wins, ties broken by the least unused area.
  """
  best, best_kept, best_wasted = None, 0, float('inf')
  for target_height, target_width in pinpoints:
    scale = min(target_width / width, target_height / height)
    kept = min(int(width * scale) * int(height * scale), width * height)
    wasted = target_width * target_height - kept
    if kept > best_kept or (kept == best_kept and wasted < best_wasted):
      best, best_kept, best_wasted = (int(target_height), int(target_width)), kept, wasted
  return best


def fitted_size(height: int, width: int, target_height: int,
                target_width: int) -> tuple[int, int]:
  """(height, width) of the image resized to fit the target with its aspect ratio kept."""
  scale_width, scale_height = target_width / width, target_height / height
  if scale_width < scale_height:
    return min(int(np.ceil(height * scale_width)), target_height), target_width
  return target_height, min(int(np.ceil(width * scale_height)), target_width)


def _centred(image: Image.Image, width: int, height: int,
             colour: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
  """`image` pasted at the centre of a `width` x `height` canvas of `colour` (RGB)."""
  canvas = Image.new('RGB', (width, height), colour)
  canvas.paste(image, ((width - image.size[0]) // 2, (height - image.size[1]) // 2))
  return canvas


def square_view(image: Image.Image, background: Sequence[float]) -> Image.Image:
  """The image centred on a square of its longer side, filled with `background` (RGB in
  [0, 1], e.g. the normalisation mean), as OneVision gives images of multi-image records."""
  image = image.convert('RGB')
  width, height = image.size
  if width == height:
    return image
  side = max(width, height)
  return _centred(image, side, side, tuple(int(x * 255) for x in background))


def anyres_views(image: Image.Image, *, pinpoints: Pinpoints, crop_size: int) -> list[Image.Image]:
  """The base view and the grid crops of an image, each `crop_size` square, RGB.

  The image is resized (bicubic) to fit the best resolution, centred on black padding to
  fill it, and cut into crops row by row.
  """
  image = image.convert('RGB')
  width, height = image.size
  target_height, target_width = select_best_resolution(height, width, pinpoints)
  new_height, new_width = fitted_size(height, width, target_height, target_width)
  resized = image.resize((new_width, new_height), resample=Image.Resampling.BICUBIC)
  canvas = _centred(resized, target_width, target_height)
  crops = [canvas.crop((left, top, left + crop_size, top + crop_size))
           for top in range(0, target_height, crop_size)
           for left in range(0, target_width, crop_size)]
  base = image.resize((crop_size, crop_size), resample=Image.Resampling.BICUBIC)
  return [base] + crops


def preprocess_anyres(
    image: Image.Image,
    *,
    pinpoints: Pinpoints,
    crop_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    tile: bool = True,
) -> np.ndarray:
  """An image's anyres views, normalised: float32 [1 + num_crops, crop_size, crop_size, 3].

  `tile=False` (OneVision's multi-image records): one view, the image padded to a square of
  the mean colour.
  """
  if tile:
    views = anyres_views(image, pinpoints=pinpoints, crop_size=crop_size)
  else:
    views = [square_view(image, image_mean)]
  return np.stack([images_lib.preprocess_image(view, image_size=crop_size, image_mean=image_mean,
                                               image_std=image_std) for view in views])


def num_views(height: int, width: int, *, pinpoints: Pinpoints, crop_size: int) -> int:
  """How many views (base + crops) an image of this size gets."""
  return 1 + num_crops(select_best_resolution(height, width, pinpoints), crop_size)


def unpadded_span(height: int, width: int, grid_height: int,
                  grid_width: int) -> tuple[slice, slice]:
  """The rows and columns of a padded feature grid that show the image, not the padding.

  The grid covers the best resolution the image was fitted into; the image fills it along
  one side and is centred along the other, as `anyres_views` pads it.
  """
  if width / height > grid_width / grid_height:
    new_height = int(round(height * (grid_width / width), 7))
    padding = (grid_height - new_height) // 2
    return slice(padding, grid_height - padding), slice(0, grid_width)
  new_width = int(round(width * (grid_height / height), 7))
  padding = (grid_width - new_width) // 2
  return slice(0, grid_height), slice(padding, grid_width - padding)


def shrunk_size(rows: int, cols: int, *, grid: int, max_crops: int) -> tuple[int, int]:
  """OneVision's anyres_max_N: a feature grid of more than ~1.1^2 * N crops' worth of
  features, shrunk to about N crops' worth with its aspect ratio kept (else unchanged)."""
  ratio = math.sqrt(rows * cols / (max_crops * grid ** 2))
  if ratio > 1.1:
    return int(rows // ratio), int(cols // ratio)
  return rows, cols


def bilinear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(low, high, fraction) [out_size] of bilinear resampling without corner alignment, as
  torch.nn.functional.interpolate(mode='bilinear'): output i reads
  (1 - fraction) * input[low] + fraction * input[high]."""
  source = np.maximum((np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  low = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  high = np.minimum(low + 1, in_size - 1)
  return low, high, (source - low).astype(np.float32)


def _one_tap(index: np.ndarray) -> Layout:
  """Rows [n] in the bilinear form: each token reads its row with weight 1."""
  taps = np.zeros((len(index), BILINEAR_TAPS), np.int64)
  taps[:, 0] = index
  weights = np.zeros((len(index), BILINEAR_TAPS), np.float32)
  weights[:, 0] = 1.0
  return Layout(taps, weights)


def _grid_layout(index: np.ndarray, max_crops: int, grid: int) -> Layout:
  """A feature grid [rows, cols] of view rows, shrunk when `max_crops` says so, each row
  followed by a NEWLINE, row by row; in the bilinear form when `max_crops`."""
  rows, cols = index.shape
  out_rows, out_cols = (shrunk_size(rows, cols, grid=grid, max_crops=max_crops)
                        if max_crops and cols else (rows, cols))
  if (out_rows, out_cols) == (rows, cols):
    flat = np.concatenate([index, np.full((rows, 1), NEWLINE)], axis=1).reshape(-1)
    return _one_tap(flat) if max_crops else Layout(flat)
  row_low, row_high, row_frac = bilinear_taps(rows, out_rows)
  col_low, col_high, col_frac = bilinear_taps(cols, out_cols)
  taps = np.stack([index[row_low][:, col_low], index[row_low][:, col_high],
                   index[row_high][:, col_low], index[row_high][:, col_high]], axis=-1)
  row_w, col_w = row_frac[:, None], col_frac[None, :]
  weights = np.stack([(1 - row_w) * (1 - col_w), (1 - row_w) * col_w,
                      row_w * (1 - col_w), row_w * col_w], axis=-1)  # [out_rows, out_cols, 4]
  newline = _one_tap(np.full((out_rows,), NEWLINE))
  taps = np.concatenate([taps, newline.index[:, None]], axis=1).reshape(-1, BILINEAR_TAPS)
  weights = np.concatenate([weights, newline.weight[:, None]], axis=1)
  return Layout(taps, weights.reshape(-1, BILINEAR_TAPS).astype(np.float32))


def _with_base(base: np.ndarray, rest: Layout, max_crops: int) -> Layout:
  """The base view's rows, then `rest`, in `rest`'s form (one row or bilinear taps)."""
  if not max_crops:
    return Layout(np.concatenate([base, rest.index]).astype(np.int32))
  base = _one_tap(base)
  return Layout(np.concatenate([base.index, rest.index]).astype(np.int32),
                np.concatenate([base.weight, rest.weight]))


def feature_layout(
    height: int, width: int, *, pinpoints: Pinpoints, crop_size: int, patch_size: int,
    max_crops: int = 0, tile: bool = True,
) -> Layout:
  """Where each of an image's LLM tokens comes from (see `Layout`).

  Rows index the image's view features [num_views * grid * grid, embed] (grid =
  crop_size // patch_size). The tokens are the base view's grid * grid features, then the
  crops' features row by row over the whole unpadded grid (shrunk bilinearly past
  `max_crops` crops' worth, OneVision), each row followed by a NEWLINE. An untiled image
  (`tile=False`, OneVision's multi-image records) is its one view's features and a NEWLINE.
  """
  grid = crop_size // patch_size
  base = np.arange(grid * grid)
  if not tile:
    return _with_base(base, _grid_layout(np.zeros((1, 0), np.int64), max_crops, grid), max_crops)
  target_height, target_width = select_best_resolution(height, width, pinpoints)
  crops_down, crops_across = target_height // crop_size, target_width // crop_size
  rows, cols = unpadded_span(height, width, crops_down * grid, crops_across * grid)
  row = np.arange(rows.start, rows.stop)[:, None]  # [rows, 1] on the crops' feature grid
  col = np.arange(cols.start, cols.stop)[None, :]  # [1, cols]
  view = 1 + (row // grid) * crops_across + col // grid
  index = view * grid * grid + (row % grid) * grid + col % grid  # [rows, cols]
  return _with_base(base, _grid_layout(index, max_crops, grid), max_crops)


def row_feature_index(layouts: Sequence[Layout], view_counts: Sequence[int], *,
                      tokens_per_view: int, max_views: int, length: int,
                      bilinear: bool = False) -> Layout:
  """The feature index of a sequence row holding several anyres images.

  The row's views sit one after another in `max_views` slots, so image i's views start at
  slot sum(view_counts[:i]); entry k is the row of the slots' flattened features
  [max_views * tokens_per_view (+ 1 for the newline), embed] that the row's k-th image token
  takes. NEWLINE becomes the last row, max_views * tokens_per_view. Entries past the last
  image token are 0 (weight 0).

  Returns:
    A Layout of `length` entries: index int32 [length] (or [length, BILINEAR_TAPS] with
    weight float32 [length, BILINEAR_TAPS], when the layouts have weights or `bilinear`
    asks for that form, e.g. for a OneVision row without images).

  Raises:
    ValueError: the images need more than `max_views` views or `length` tokens.
  """
  if sum(view_counts) > max_views:
    raise ValueError(f'the images need {sum(view_counts)} views, more than {max_views}')
  newline = max_views * tokens_per_view
  parts, weights, first_view = [], [], 0
  for layout, count in zip(layouts, view_counts):
    parts.append(np.where(layout.index == NEWLINE, newline,
                          layout.index + first_view * tokens_per_view))
    weights.append(layout.weight)
    first_view += count
  tapped = bilinear or any(weight is not None for weight in weights)
  empty_shape = (0, BILINEAR_TAPS) if tapped else (0,)
  index = np.concatenate(parts) if parts else np.zeros(empty_shape, np.int32)
  if len(index) > length:
    raise ValueError(f'the images need {len(index)} image tokens, more than {length}')
  padding = [(0, length - len(index))] + [(0, 0)] * (index.ndim - 1)
  index = np.pad(index, padding).astype(np.int32)
  if not tapped:
    return Layout(index)
  weight = np.concatenate(weights) if weights else np.zeros(empty_shape, np.float32)
  return Layout(index, np.pad(weight, padding).astype(np.float32))


@dataclasses.dataclass(frozen=True)
class AnyresSpec:
  """How an anyres model's images become views and tokens in an example.

  pinpoints: the grids' resolutions (height, width), as the model's image_grid_pinpoints.
  patch_size: the tower's; a view is (crop_size // patch_size) ** 2 features.
  max_crops: OneVision's anyres_max_N (0: LLaVA-NeXT, no shrinking, multi-image records tiled).
  max_views: view slots per example (base views and crops of all its images).
  """

  pinpoints: tuple[tuple[int, int], ...]
  patch_size: int
  max_crops: int
  max_views: int


def num_crops(pinpoint: Sequence[int], crop_size: int) -> int:
  """The crops of a grid resolution (height, width)."""
  return -(-int(pinpoint[0]) // crop_size) * -(-int(pinpoint[1]) // crop_size)


def limited_pinpoints(pinpoints: Pinpoints, crop_size: int,
                      max_tiles: int) -> tuple[tuple[int, int], ...]:
  """The resolutions of at most `max_tiles` crops (all of them for 0).

  Raises:
    ValueError: none is left.
  """
  kept = tuple((int(h), int(w)) for h, w in pinpoints
               if not max_tiles or num_crops((h, w), crop_size) <= max_tiles)
  if not kept:
    fewest = min(num_crops(pinpoint, crop_size) for pinpoint in pinpoints)
    raise ValueError(f'every grid has more than {max_tiles} crops (the smallest has {fewest})')
  return kept


@dataclasses.dataclass(frozen=True)
class ImagePlan:
  """How the images of one example are tiled: one layout and view count each."""

  layouts: tuple[Layout, ...]
  view_counts: tuple[int, ...]
  tile: bool
  pinpoints: tuple[tuple[int, int], ...]  # the resolutions the grids were chosen from
  reduced: str = ''  # what the budget changed, for a log line; '' if nothing

  @property
  def num_tokens(self) -> tuple[int, ...]:
    """Each image's LLM tokens."""
    return tuple(len(layout) for layout in self.layouts)


def plan_images(sizes: Sequence[tuple[int, int]], spec: AnyresSpec, *, crop_size: int,
                max_image_tokens: int) -> ImagePlan:
  """Tiles images of these (height, width) sizes within the example's budget.

  The grids come from all of `spec.pinpoints` when the views fit `spec.max_views` slots and
  the tokens `max_image_tokens`; otherwise from the pinpoints of at most k crops, for the
  largest k that fits (the same for every image of the example), which is deterministic and
  `reduced` says so. OneVision (`max_crops`) does not tile the images of a multi-image record.

  Raises:
    ValueError: even the smallest grids do not fit.
  """
  tile = not (spec.max_crops and len(sizes) > 1)
  limits = sorted({num_crops(pinpoint, crop_size) for pinpoint in spec.pinpoints}, reverse=True)
  for limit in (limits if tile else limits[:1]):
    pinpoints = limited_pinpoints(spec.pinpoints, crop_size, limit)
    layouts = tuple(feature_layout(height, width, pinpoints=pinpoints, crop_size=crop_size,
                                   patch_size=spec.patch_size, max_crops=spec.max_crops,
                                   tile=tile) for height, width in sizes)
    view_counts = tuple(num_views(height, width, pinpoints=pinpoints, crop_size=crop_size)
                        if tile else 1 for height, width in sizes)
    num_tokens = sum(len(layout) for layout in layouts)
    if sum(view_counts) <= spec.max_views and num_tokens <= max_image_tokens:
      return ImagePlan(layouts, view_counts, tile, pinpoints,
                       _reduction(sizes, spec.pinpoints, pinpoints, crop_size))
  raise ValueError(
      f'{len(sizes)} image(s) need {sum(view_counts)} views and {num_tokens} image tokens '
      f'even on the smallest grids; the example has {spec.max_views} view slots '
      f'(data.max_views) and room for {max_image_tokens} image tokens (data.seq_len)')


def _grid_name(height: int, width: int, pinpoints: Pinpoints, crop_size: int) -> str:
  target_height, target_width = select_best_resolution(height, width, pinpoints)
  return f'{-(-target_height // crop_size)}x{-(-target_width // crop_size)}'


def _reduction(sizes: Sequence[tuple[int, int]], full: Pinpoints, kept: Pinpoints,
               crop_size: int) -> str:
  """'' when every image gets the grid it gets from all pinpoints; else what changed."""
  changes = []
  for height, width in sizes:
    before = _grid_name(height, width, full, crop_size)
    after = _grid_name(height, width, kept, crop_size)
    if before != after:
      changes.append(f'a {width}x{height} image tiled {after} instead of {before} crops')
  return '; '.join(changes) + (' to fit the budget' if changes else '')
