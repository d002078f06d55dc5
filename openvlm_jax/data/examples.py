"""A parsed record -> one fixed-size training example (numpy), and the checks before it.

An example holds, for sequence length `seq_len` and up to `max_images` images:
  input_ids       int32   [seq_len]   right-padded with the pad id
  targets         int32   [seq_len]   input_ids shifted left by one, pad at the end
  loss_mask       float32 [seq_len]   1 where targets[t] is an assistant token
  attention_mask  int32   [seq_len]   1 for real tokens
  positions       int32   [seq_len]   0..num_tokens-1, 0 on padding
  prefix_len      int32   []          index of the first answer token: the image tokens, system
                                      text, first user turn and assistant header before it
                                      form the prefix of a prefix LM (`model.prefix_attention`)
  images          float32 [max_images, H, W, 3]  zeros in unused slots
  num_images      int32   []
For an anyres model (`ExampleSpec.anyres`: LLaVA-NeXT, OneVision) each image takes as many
slots as it has views and as many tokens as its size gives (`anyres.plan_images`), and:
  images                float32 [max_views, H, W, 3]  the views of the images, in order
  image_feature_index   int32   [seq_len] (OneVision: [seq_len, 4])  the view feature each
                                image token takes (`anyres.row_feature_index`)
  image_feature_weight  float32 [seq_len, 4]  OneVision only: the bilinear weights
A record comes from `jsonl.parse_record` (images as `image_paths`) or from an in-memory source
(images as encoded `image_bytes`).
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from openvlm_jax.data import anyres as anyres_lib
from openvlm_jax.data import conversation
from openvlm_jax.data import images as images_lib


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """How records become examples: tokenizer, image preprocessing and fixed sizes."""

  tokenizer: Any
  image_size: int
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]
  num_image_tokens: int
  seq_len: int
  max_images: int
  anyres: anyres_lib.AnyresSpec | None = None  # tiles images for LLaVA-NeXT / OneVision

  @property
  def image_slots(self) -> int:
    """Rows of an example's `images`: one per image, or per view with `anyres`."""
    return self.anyres.max_views if self.anyres else self.max_images

  @property
  def pad_id(self) -> int:
    """The tokenizer's pad id (its eos id if it has no pad token)."""
    pad_id = self.tokenizer.pad_token_id
    return self.tokenizer.eos_token_id if pad_id is None else pad_id


def _num_images(record: dict[str, Any]) -> int:
  return len(_image_sources(record))


def _image_sources(record: dict[str, Any]) -> list[str | bytes]:
  """A record's images: file paths or encoded bytes."""
  return list(record.get('image_paths') or []) + list(record.get('image_bytes') or [])


def _check_num_images(record: dict[str, Any], spec: ExampleSpec) -> int:
  num_images = _num_images(record)
  if num_images > spec.max_images:
    raise ValueError(f'{num_images} images, more than max_images={spec.max_images}')
  return num_images


def image_plan(record: dict[str, Any], spec: ExampleSpec, num_text_tokens: int,
               sizes: Sequence[tuple[int, int]] | None = None) -> anyres_lib.ImagePlan:
  """How an anyres spec tiles a record's images next to `num_text_tokens` of text.

  `sizes` (height, width) default to the images' headers.

  Raises:
    ValueError: the images do not fit the example (see `anyres.plan_images`).
  """
  if sizes is None:
    sizes = [images_lib.image_size(source) for source in _image_sources(record)]
  return anyres_lib.plan_images(sizes, spec.anyres, crop_size=spec.image_size,
                                max_image_tokens=spec.seq_len - num_text_tokens)


def _anyres_widened(tokens: dict[str, np.ndarray], record: dict[str, Any], spec: ExampleSpec,
                    num_images: int) -> tuple[dict[str, np.ndarray], anyres_lib.ImagePlan | None]:
  """Tokens encoded with one token per image, widened to each anyres image's own count
  (planned beside the text they hold); unchanged, with no plan, for a single-view spec or a
  record without images."""
  if spec.anyres is None or not num_images:
    return tokens, None
  plan = image_plan(record, spec, len(tokens['input_ids']) - num_images)
  widened = conversation.widen_image_tokens(
      tokens['input_ids'], tokens['loss_mask'],
      image_token_id=conversation.image_token_id(spec.tokenizer, num_images),
      num_image_tokens=plan.num_tokens, num_images=num_images)
  return widened, plan


def _tokens_per_image(spec: ExampleSpec, num_images: int) -> int:
  """What the conversation is first widened to: the spec's count, or 1 for anyres images."""
  return 1 if spec.anyres is not None and num_images else spec.num_image_tokens


def encode_tokens(record: dict[str, Any], spec: ExampleSpec) -> dict[str, np.ndarray]:
  """Tokenizes a record's conversation and checks it fits.

  Returns:
    `input_ids`, `loss_mask` int32 [num_tokens].

  Raises:
    ValueError: (without file:line; callers add it) for a bad conversation, too many images
      or more than `seq_len` tokens.
  """
  return _encode_tokens(record, spec)[0]


def _encode_tokens(record: dict[str, Any],
                   spec: ExampleSpec) -> tuple[dict[str, np.ndarray], anyres_lib.ImagePlan | None]:
  num_images = _check_num_images(record, spec)
  tokens = conversation.encode_conversation(
      record['conversations'], tokenizer=spec.tokenizer, num_images=num_images,
      num_image_tokens=_tokens_per_image(spec, num_images))
  tokens, plan = _anyres_widened(tokens, record, spec, num_images)
  num_tokens = len(tokens['input_ids'])
  if num_tokens > spec.seq_len:
    raise ValueError(f'{num_tokens} tokens, longer than seq_len={spec.seq_len}')
  return tokens, plan


def _check_images(record: dict[str, Any], decode_images: bool) -> None:
  for path_or_bytes in (record.get('image_paths') or []) + (record.get('image_bytes') or []):
    images_lib.verify_image(path_or_bytes, full_decode=decode_images)


def check_record(
    record: dict[str, Any], spec: ExampleSpec, decode_images: bool = True
) -> dict[str, np.ndarray]:
  """Validates a training record: its conversation encodes and fits, its images are sound.

  Images are decoded fully (`decode_images`), or checked with Pillow's cheap `verify()`,
  which lets e.g. a truncated JPEG through.

  Returns:
    The record's tokens (`encode_tokens`), which the pipeline keeps so that no record is
    tokenized again; with `reduced` (a str) when the image budget tiled its images with
    fewer crops than their size asks for (`anyres.plan_images`).

  Raises:
    ValueError: with the reason (no file:line; callers add it).
  """
  tokens, plan = _encode_tokens(record, spec)
  _check_images(record, decode_images)
  if plan is not None and plan.reduced:
    tokens = dict(tokens, reduced=plan.reduced)
  return tokens


def encode_prompt(record: dict[str, Any], spec: ExampleSpec) -> tuple[np.ndarray, str | None]:
  """The prompt of a record's last answer and that answer (see `conversation.encode_prompt`).

  Raises:
    ValueError: for a bad conversation, too many images, or a prompt longer than `seq_len`.
  """
  num_images = _check_num_images(record, spec)
  prompt, reference = conversation.encode_prompt(
      record['conversations'], tokenizer=spec.tokenizer, num_images=num_images,
      num_image_tokens=_tokens_per_image(spec, num_images))
  prompt = _anyres_widened({'input_ids': prompt, 'loss_mask': np.zeros_like(prompt)}, record,
                           spec, num_images)[0]['input_ids']
  if len(prompt) > spec.seq_len:
    raise ValueError(f'a prompt of {len(prompt)} tokens, longer than seq_len={spec.seq_len}')
  return prompt, reference


def check_question(
    record: dict[str, Any], spec: ExampleSpec, decode_images: bool = True
) -> None:
  """Validates a record to be answered: its prompt encodes and fits, its images are sound.

  Raises:
    ValueError: with the reason (no file:line; callers add it).
  """
  encode_prompt(record, spec)
  _check_images(record, decode_images)


def load_images(record: dict[str, Any], spec: ExampleSpec) -> np.ndarray:
  """Returns float32 [max_images, H, W, 3], zeros after the record's own images (a
  single-view spec; see `image_inputs` for anyres)."""
  size = spec.image_size
  pixels = np.zeros((spec.max_images, size, size, 3), dtype=np.float32)
  for slot, source in enumerate(_image_sources(record)):
    pixels[slot] = images_lib.load_image(source, image_size=size, image_mean=spec.image_mean,
                                         image_std=spec.image_std)
  return pixels


def image_inputs(record: dict[str, Any], spec: ExampleSpec,
                 input_ids: np.ndarray) -> dict[str, np.ndarray]:
  """The model's image inputs for a record whose tokens (or prompt) are `input_ids`.

  Returns:
    `images` (see the module docstring); with `spec.anyres` also `image_feature_index` and
    (OneVision) `image_feature_weight`, laid out for the image tokens of `input_ids`.

  Raises:
    ValueError: an image cannot be read, or its tokens in `input_ids` are not the ones its
      size gives (it changed after the tokens were made).
  """
  if spec.anyres is None:
    return {'images': load_images(record, spec)}
  size, anyres = spec.image_size, spec.anyres
  pixels = np.zeros((spec.image_slots, size, size, 3), dtype=np.float32)
  decoded = [images_lib.open_image(source) for source in _image_sources(record)]
  plan = None
  if decoded:
    image_token_id = conversation.image_token_id(spec.tokenizer, len(decoded))
    num_image_tokens = int(np.sum(input_ids == image_token_id))
    plan = image_plan(record, spec, len(input_ids) - num_image_tokens,
                      sizes=[(image.height, image.width) for image in decoded])
    if sum(plan.num_tokens) != num_image_tokens:
      raise ValueError(f'the images take {sum(plan.num_tokens)} tokens, but the record was '
                       f'tokenized with {num_image_tokens}: did an image change?')
    slot = 0
    for image in decoded:
      views = anyres_lib.preprocess_anyres(
          image, pinpoints=plan.pinpoints, crop_size=size, image_mean=spec.image_mean,
          image_std=spec.image_std, tile=plan.tile)
      pixels[slot:slot + len(views)] = views
      slot += len(views)
  layout = anyres_lib.row_feature_index(
      plan.layouts if plan else [], plan.view_counts if plan else [],
      tokens_per_view=spec.num_image_tokens, max_views=anyres.max_views, length=spec.seq_len,
      bilinear=bool(anyres.max_crops))
  return {'images': pixels, **_layout_fields(layout)}


def _layout_fields(layout: anyres_lib.Layout) -> dict[str, np.ndarray]:
  """A row's feature index (and OneVision's weights) as example fields."""
  if layout.weight is None:
    return {'image_feature_index': layout.index}
  return {'image_feature_index': layout.index, 'image_feature_weight': layout.weight}


def prefix_length(loss_mask: np.ndarray) -> int:
  """The number of tokens before the first answer token (all of them if there is none).

  Args:
    loss_mask: [num_tokens], nonzero at assistant tokens (unshifted, as `encode_tokens`
      returns it).
  """
  answer_indices = np.flatnonzero(loss_mask)
  return int(answer_indices[0]) if answer_indices.size else len(loss_mask)


def make_example(record: dict[str, Any], spec: ExampleSpec) -> dict[str, np.ndarray]:
  """Encodes one record into a fixed-size example (see the module docstring for fields).

  A record that carries its `tokens` (validated by `check_record`) is not tokenized again.

  Raises:
    ValueError: `"path:line: reason"` when the record cannot be encoded.
  """
  try:
    tokens = record.get('tokens') or encode_tokens(record, spec)
    images = image_inputs(record, spec, tokens['input_ids'])
  except ValueError as error:
    raise ValueError(f"{record.get('where', '?')}: {error}") from error
  return dict(token_fields(tokens, spec), **images,
              num_images=np.asarray(_num_images(record), dtype=np.int32))


def token_fields(tokens: dict[str, np.ndarray], spec: ExampleSpec) -> dict[str, np.ndarray]:
  """An example's per-token fields and `prefix_len` from `encode_tokens`'s result."""
  num_tokens = len(tokens['input_ids'])
  seq_len = spec.seq_len
  input_ids = np.full((seq_len,), spec.pad_id, dtype=np.int32)
  input_ids[:num_tokens] = tokens['input_ids']
  targets = np.full((seq_len,), spec.pad_id, dtype=np.int32)
  targets[:num_tokens - 1] = tokens['input_ids'][1:]
  loss_mask = np.zeros((seq_len,), dtype=np.float32)
  loss_mask[:num_tokens - 1] = tokens['loss_mask'][1:]
  attention_mask = np.zeros((seq_len,), dtype=np.int32)
  attention_mask[:num_tokens] = 1
  positions = np.zeros((seq_len,), dtype=np.int32)
  positions[:num_tokens] = np.arange(num_tokens, dtype=np.int32)
  return {
      'input_ids': input_ids,
      'targets': targets,
      'loss_mask': loss_mask,
      'attention_mask': attention_mask,
      'positions': positions,
      'prefix_len': np.asarray(prefix_length(tokens['loss_mask']), dtype=np.int32),
  }


def _rejected(record: dict[str, Any]) -> dict[str, Any]:
  """A preference record seen as its rejected conversation."""
  if 'rejected_conversations' not in record:
    raise ValueError("not a preference record: it needs 'chosen' and 'rejected' answers")
  return dict(record, conversations=record['rejected_conversations'], tokens=None)


def check_pair(record: dict[str, Any], spec: ExampleSpec, decode_images: bool = True) -> None:
  """Validates a preference record: both conversations encode and fit, its images are sound.

  Raises:
    ValueError: with the reason (no file:line; callers add it).
  """
  encode_tokens(_rejected(record), spec)
  encode_tokens(record, spec)
  _check_images(record, decode_images)


def make_pair_example(record: dict[str, Any], spec: ExampleSpec) -> dict[str, np.ndarray]:
  """A preference record as two rows, chosen then rejected: every field gains a [2] axis.

  Both rows share the record's images (decoded once; for anyres, each row tiles them within
  its own budget); each has its own tokens and loss mask (the answer), so a DPO objective
  reads each answer's log-probability from its row.

  Raises:
    ValueError: `"path:line: reason"` when the record cannot be encoded.
  """
  try:
    tokens = [encode_tokens(view, spec) for view in (record, _rejected(record))]
    images = [image_inputs(record, spec, tokens[0]['input_ids'])]
    # An anyres budget may tile the rows' images differently (their texts differ in length).
    images.append(images[0] if spec.anyres is None
                  else image_inputs(record, spec, tokens[1]['input_ids']))
  except ValueError as error:
    raise ValueError(f"{record.get('where', '?')}: {error}") from error
  num_images = np.asarray(_num_images(record), dtype=np.int32)
  rows = [dict(token_fields(row, spec), **row_images, num_images=num_images)
          for row, row_images in zip(tokens, images)]
  return stack_examples(rows)


def empty_pair_example(spec: ExampleSpec) -> dict[str, np.ndarray]:
  """Two all-padding rows (see `empty_example`), for padding eval batches of pairs."""
  return stack_examples([empty_example(spec)] * 2)


def empty_image_inputs(spec: ExampleSpec) -> dict[str, np.ndarray]:
  """The image inputs of a row without images (see `image_inputs`): zero images, and an
  anyres model's empty feature index."""
  return image_inputs({}, spec, np.zeros((0,), np.int32))


def empty_example(spec: ExampleSpec) -> dict[str, np.ndarray]:
  """An all-padding example (no tokens, no images, zero loss), for padding eval batches."""
  seq_len = spec.seq_len
  return {
      'input_ids': np.full((seq_len,), spec.pad_id, dtype=np.int32),
      'targets': np.full((seq_len,), spec.pad_id, dtype=np.int32),
      'loss_mask': np.zeros((seq_len,), dtype=np.float32),
      'attention_mask': np.zeros((seq_len,), dtype=np.int32),
      'positions': np.zeros((seq_len,), dtype=np.int32),
      'prefix_len': np.asarray(0, dtype=np.int32),
      **empty_image_inputs(spec),
      'num_images': np.asarray(0, dtype=np.int32),
  }


def stack_examples(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch: each field gains a leading [batch] axis."""
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}
