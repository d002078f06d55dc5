"""A LLaVA-style vision-language model: vision tower -> projector -> decoder LLM.

The data pipeline expands every image into `vision.num_image_tokens` consecutive copies of
`image_token_id` (as Hugging Face's LlavaProcessor does); the model replaces the embeddings
at those positions with the projected image features, in order, image after image.

With `image_grid_pinpoints` (LLaVA-NeXT's anyres, `data/anyres.py`) an image is several views
in consecutive image slots, and an `image_feature_index` says which view feature (or the
learned `image_newline` row) each image token takes.
"""


import flax.linen as nn
import jax
import jax.numpy as jnp

from openvlm_jax.models import layers
from openvlm_jax.models.config import VLMConfig
from openvlm_jax.models.llm import LLM
from openvlm_jax.models.projector import Projector
from openvlm_jax.models.vision import VisionTower


def merge_image_features(
    input_ids: jax.Array,
    text_embeds: jax.Array,
    image_features: jax.Array,
    image_token_id: int,
    feature_index: jax.Array | None = None,
    newline: jax.Array | None = None,
    feature_weight: jax.Array | None = None,
) -> jax.Array:
  """Writes image features into the image-token positions of the text embeddings.

  Args:
    input_ids: [batch, seq] int.
    text_embeds: [batch, seq, embed].
    image_features: [batch, max_images, tokens, embed], flattened per example into a table
      [max_images * tokens, embed] (plus `newline` as its last row when given).
    image_token_id: the placeholder token id.
    feature_index: optional [batch, max_image_tokens] int: the table row that the k-th image
      token of an example takes; or [batch, max_image_tokens, taps] rows that it mixes with
      `feature_weight` (OneVision's bilinear shrinking). None: row k (images one after
      another, every image `tokens` long). Entries past the last image token are never read.
    newline: optional [embed], appended to the table (anyres's image_newline).
    feature_weight: [batch, max_image_tokens, taps] float, with a 3-D `feature_index`.

  Returns:
    [batch, seq, embed] in the dtype of `text_embeds`.
  """
  batch, max_images, tokens, embed = image_features.shape
  table = image_features.reshape(batch, max_images * tokens, embed)
  if newline is not None:
    newline_rows = jnp.broadcast_to(newline.astype(table.dtype), (batch, 1, embed))
    table = jnp.concatenate([table, newline_rows], axis=1)
  is_image = input_ids == image_token_id  # [batch, seq]
  token_number = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1  # k of each image token
  if feature_index is None:
    feature_row = jnp.clip(token_number, 0, max_images * tokens - 1)
    gathered = jnp.take_along_axis(table, feature_row[..., None], axis=1)  # [b, s, e]
  elif feature_index.ndim == 2:
    token_number = jnp.clip(token_number, 0, feature_index.shape[1] - 1)
    feature_row = jnp.take_along_axis(feature_index, token_number, axis=1)  # [b, s]
    gathered = jnp.take_along_axis(table, feature_row[..., None], axis=1)
  else:
    token_number = jnp.clip(token_number, 0, feature_index.shape[1] - 1)[..., None]
    rows = jnp.take_along_axis(feature_index, token_number, axis=1)  # [b, s, taps]
    weights = jnp.take_along_axis(feature_weight, token_number, axis=1)
    taps = jax.vmap(lambda t, r: t[r])(table, rows)  # [b, s, taps, e]
    gathered = jnp.einsum('bste,bst->bse', taps, weights.astype(table.dtype))
  return jnp.where(is_image[..., None], gathered.astype(text_embeds.dtype), text_embeds)


class VLM(nn.Module):
  """LLaVA: parameters under 'vision', 'projector' and 'llm'."""

  config: VLMConfig

  def setup(self):
    cfg = self.config
    kw = {'dtype': layers.to_dtype(cfg.dtype), 'param_dtype': layers.to_dtype(cfg.param_dtype)}
    stack_kw = {'remat': cfg.remat, 'scan_layers': cfg.scan_layers, 'attention_impl': cfg.attention_impl}
    kw['lora'] = cfg.layer_lora
    self.vision = VisionTower(cfg.vision, **kw, **stack_kw)
    self.projector = Projector(
        cfg.projector, cfg.llm.hidden_size, use_bias=cfg.projector_bias, **kw
    )
    self.llm = LLM(cfg.llm, **kw, **stack_kw)
    if cfg.image_grid_pinpoints:
      # As LlavaNextModel initialises it: normal with std 1 / sqrt(hidden).
      init = nn.initializers.normal(stddev=cfg.llm.hidden_size ** -0.5)
      self.image_newline = self.param(
          'image_newline', nn.with_logical_partitioning(init, ('embed',)),
          (cfg.llm.hidden_size,), kw['param_dtype'])

  def merge(self, input_ids, text_embeds, image_features, image_feature_index,
            image_feature_weight):
    """`merge_image_features` with this model's image token and newline row."""
    newline = self.image_newline if self.config.image_grid_pinpoints else None
    if newline is not None and image_feature_index is None:
      raise ValueError('an anyres model (image_grid_pinpoints) needs image_feature_index')
    if self.config.anyres_max_crops and image_feature_weight is None:
      raise ValueError('a OneVision model (anyres_max_crops) needs image_feature_weight')
    return merge_image_features(input_ids, text_embeds, image_features,
                                self.config.image_token_id, image_feature_index, newline,
                                image_feature_weight)

  def encode_images(self, images: jax.Array) -> jax.Array:
    """Projected image features: images [b, n, H, W, 3] -> [b, n, num_image_tokens, embed]."""
    batch, num_images = images.shape[:2]
    features = self.vision(images.reshape(batch * num_images, *images.shape[2:]))
    features = self.projector(features)  # [b * n, tokens, embed]
    return features.reshape(batch, num_images, *features.shape[1:])

  def __call__(
      self,
      input_ids: jax.Array,
      images: jax.Array | None = None,
      *,
      positions: jax.Array | None = None,
      attention_mask: jax.Array,
      prefix_len: jax.Array | None = None,
      prefix_end: jax.Array | None = None,
      image_features: jax.Array | None = None,
      image_feature_index: jax.Array | None = None,
      image_feature_weight: jax.Array | None = None,
      deterministic: bool = True,
  ) -> jax.Array:
    """Next-token logits of a batch of interleaved text and images.

    Args:
      input_ids: [batch, seq] int32 with each image expanded into `num_image_tokens` copies of
        `image_token_id`.
      images: [batch, max_images, H, W, 3] float32, normalised; padding images are ignored.
      positions: [batch, seq] rotary positions (default: cumsum of the mask - 1).
      attention_mask: [batch, seq] segment ids: 1 at real tokens, 0 at padding; 1, 2, ...
        for examples packed into one row (with their `positions`; their images follow each
        other in `images`, in the order of their image tokens).
      prefix_len: optional [batch] int (prefix LM, `config.prefix_attention`): positions
        < prefix_len[b] attend to each other bidirectionally, the rest causally. Used
        whenever given; None is plain causal attention.
      prefix_end: optional [batch, seq] int, the per-token form of `prefix_len` that packed
        rows need (`LLM.__call__`).
      image_features: [batch, max_images, tokens, embed] from `encode_images`, used instead
        of `images` when given (e.g. to encode once before decoding).
      image_feature_index: [batch, max_image_tokens] int, the feature row each image token
        takes (`merge_image_features`); anyres models need it, others may leave it None.
      image_feature_weight: [batch, max_image_tokens, taps] float, the bilinear weights of a
        3-D `image_feature_index` (OneVision, `anyres_max_crops`).
      deterministic: unused (no dropout).

    Returns:
      [batch, seq, vocab] float32 logits.
    """
    text_embeds = self.llm.embed(input_ids)  # [batch, seq, embed]
    if image_features is None and images is not None:
      image_features = self.encode_images(images)
    if image_features is not None:
      text_embeds = self.merge(input_ids, text_embeds, image_features, image_feature_index,
                               image_feature_weight)
    return self.llm(
        inputs_embeds=text_embeds,
        positions=positions,
        attention_mask=attention_mask,
        prefix_len=prefix_len,
        prefix_end=prefix_end,
        deterministic=deterministic,
    )

  def decode(
      self,
      input_ids: jax.Array,
      *,
      positions: jax.Array,
      cache_mask: jax.Array,
      cache: dict,
      write_index: jax.Array,
      image_features: jax.Array | None = None,
      image_feature_index: jax.Array | None = None,
      image_feature_weight: jax.Array | None = None,
      prefix_len: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """A chunk of tokens through the LLM's KV cache (see `LLM.decode`).

    input_ids [batch, chunk]; image_features [batch, max_images, tokens, embed] from
    `encode_images`, merged at the chunk's image tokens (give them with the prompt), with
    `image_feature_index` (and `image_feature_weight`) for anyres models; prefix_len [batch], cache slots of the bidirectional prefix (prefix LM) or None.
    Returns (float32 logits [batch, chunk, vocab], the updated cache).
    """
    text_embeds = self.llm.embed(input_ids)  # [batch, chunk, embed]
    if image_features is not None:
      text_embeds = self.merge(input_ids, text_embeds, image_features, image_feature_index,
                               image_feature_weight)
    return self.llm.decode(text_embeds, positions=positions, cache_mask=cache_mask,
                           cache=cache, write_index=write_index, prefix_len=prefix_len)


def dummy_inputs(config: VLMConfig, batch_size: int = 1, seq_len: int = 8) -> dict:
  """Zero inputs of the right shapes and dtypes for `VLM.init` (one image per example)."""
  size = config.vision.image_size
  inputs = {
      'input_ids': jnp.zeros((batch_size, seq_len), jnp.int32),
      'images': jnp.zeros((batch_size, 1, size, size, 3), jnp.float32),
      'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)),
      'attention_mask': jnp.ones((batch_size, seq_len), jnp.int32),
  }
  if config.anyres_max_crops:  # 4 bilinear taps per token (data/anyres.BILINEAR_TAPS)
    inputs['image_feature_index'] = jnp.zeros((batch_size, seq_len, 4), jnp.int32)
    inputs['image_feature_weight'] = jnp.zeros((batch_size, seq_len, 4), jnp.float32)
  elif config.image_grid_pinpoints:
    inputs['image_feature_index'] = jnp.zeros((batch_size, seq_len), jnp.int32)
  return inputs


def init_params(
    config: VLMConfig, rng: jax.Array, batch_size: int = 1, seq_len: int = 8
) -> dict:
  """Fresh variables {'params': ...} with `nn.Partitioned` boxes (logical axis names).

  Read the logical specs with `nn.get_partition_spec(variables)`, the arrays with
  `nn.unbox(variables)`. Wrap in `jax.eval_shape` for shapes without allocating.
  """
  inputs = dummy_inputs(config, batch_size, seq_len)
  input_ids, images = inputs.pop('input_ids'), inputs.pop('images')
  return jax.jit(VLM(config).init)(rng, input_ids, images, **inputs)
