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
A record comes from `jsonl.parse_record` (images as `image_paths`) or from an in-memory source
(images as encoded `image_bytes`).
"""

import dataclasses
from typing import Any

import numpy as np

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

  @property
  def pad_id(self) -> int:
    """The tokenizer's pad id (its eos id if it has no pad token)."""
    pad_id = self.tokenizer.pad_token_id
    return self.tokenizer.eos_token_id if pad_id is None else pad_id


def _num_images(record: dict[str, Any]) -> int:
  return len(record.get('image_paths') or record.get('image_bytes') or [])


def encode_tokens(record: dict[str, Any], spec: ExampleSpec) -> dict[str, np.ndarray]:
  """Tokenizes a record's conversation and checks it fits.

  Returns:
    `input_ids`, `loss_mask` int32 [num_tokens].

  Raises:
    ValueError: (without file:line; callers add it) for a bad conversation, too many images
      or more than `seq_len` tokens.
  """
  num_images = _num_images(record)
  if num_images > spec.max_images:
    raise ValueError(f'{num_images} images, more than max_images={spec.max_images}')
  tokens = conversation.encode_conversation(
      record['conversations'],
      tokenizer=spec.tokenizer,
      num_images=num_images,
      num_image_tokens=spec.num_image_tokens,
  )
  num_tokens = len(tokens['input_ids'])
  if num_tokens > spec.seq_len:
    raise ValueError(f'{num_tokens} tokens, longer than seq_len={spec.seq_len}')
  return tokens


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
    tokenized again.

  Raises:
    ValueError: with the reason (no file:line; callers add it).
  """
  tokens = encode_tokens(record, spec)
  _check_images(record, decode_images)
  return tokens


def encode_prompt(record: dict[str, Any], spec: ExampleSpec) -> tuple[np.ndarray, str | None]:
  """The prompt of a record's last answer and that answer (see `conversation.encode_prompt`).

  Raises:
    ValueError: for a bad conversation, too many images, or a prompt longer than `seq_len`.
  """
  num_images = _num_images(record)
  if num_images > spec.max_images:
    raise ValueError(f'{num_images} images, more than max_images={spec.max_images}')
  prompt, reference = conversation.encode_prompt(
      record['conversations'], tokenizer=spec.tokenizer, num_images=num_images,
      num_image_tokens=spec.num_image_tokens)
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
  """Returns float32 [max_images, H, W, 3], zeros after the record's own images."""
  size = spec.image_size
  pixels = np.zeros((spec.max_images, size, size, 3), dtype=np.float32)
  kwargs = {'image_size': size, 'image_mean': spec.image_mean, 'image_std': spec.image_std}
  for slot, path in enumerate(record.get('image_paths') or []):
    pixels[slot] = images_lib.load_image(path, **kwargs)
  for slot, data in enumerate(record.get('image_bytes') or []):
    pixels[slot] = images_lib.decode_image_bytes(data, **kwargs)
  return pixels


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
    pixels = load_images(record, spec)
  except ValueError as error:
    raise ValueError(f"{record.get('where', '?')}: {error}") from error
  return dict(token_fields(tokens, spec), images=pixels,
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

  Both rows share the record's images (decoded once); each has its own tokens and loss mask
  (the answer), so a DPO objective reads each answer's log-probability from its row.

  Raises:
    ValueError: `"path:line: reason"` when the record cannot be encoded.
  """
  try:
    rows = [token_fields(encode_tokens(view, spec), spec) for view in (record, _rejected(record))]
    pixels = load_images(record, spec)
  except ValueError as error:
    raise ValueError(f"{record.get('where', '?')}: {error}") from error
  num_images = np.asarray(_num_images(record), dtype=np.int32)
  return dict(stack_examples(rows), images=np.stack([pixels, pixels]),
              num_images=np.stack([num_images, num_images]))


def empty_pair_example(spec: ExampleSpec) -> dict[str, np.ndarray]:
  """Two all-padding rows (see `empty_example`), for padding eval batches of pairs."""
  return stack_examples([empty_example(spec)] * 2)


def empty_example(spec: ExampleSpec) -> dict[str, np.ndarray]:
  """An all-padding example (no tokens, no images, zero loss), for padding eval batches."""
  seq_len, size = spec.seq_len, spec.image_size
  return {
      'input_ids': np.full((seq_len,), spec.pad_id, dtype=np.int32),
      'targets': np.full((seq_len,), spec.pad_id, dtype=np.int32),
      'loss_mask': np.zeros((seq_len,), dtype=np.float32),
      'attention_mask': np.zeros((seq_len,), dtype=np.int32),
      'positions': np.zeros((seq_len,), dtype=np.int32),
      'prefix_len': np.asarray(0, dtype=np.int32),
      'images': np.zeros((spec.max_images, size, size, 3), dtype=np.float32),
      'num_images': np.asarray(0, dtype=np.int32),
  }


def stack_examples(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stacks examples into a batch: each field gains a leading [batch] axis."""
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}
