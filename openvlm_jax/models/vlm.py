"""A LLaVA-style vision-language model: vision tower -> projector -> decoder LLM.

The data pipeline expands every image into `vision.num_image_tokens` consecutive copies of
`image_token_id` (as Hugging Face's LlavaProcessor does); the model replaces the embeddings
at those positions with the projected image features, in order, image after image.
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
) -> jax.Array:
  """Writes image features into the image-token positions of the text embeddings.

  Args:
    input_ids: [batch, seq] int.
    text_embeds: [batch, seq, embed].
    image_features: [batch, max_images, tokens, embed]; the k-th image token of an example
      takes row k of its flattened [max_images * tokens, embed] features. Rows past the last
      image token (padding images) are never read.
    image_token_id: the placeholder token id.

  Returns:
    [batch, seq, embed] in the dtype of `text_embeds`.
  """
  batch, max_images, tokens, embed = image_features.shape
  flat_features = image_features.reshape(batch, max_images * tokens, embed)
  is_image = input_ids == image_token_id  # [batch, seq]
  feature_index = jnp.cumsum(is_image.astype(jnp.int32), axis=1) - 1
  feature_index = jnp.clip(feature_index, 0, max_images * tokens - 1)
  gathered = jnp.take_along_axis(flat_features, feature_index[..., None], axis=1)  # [b, s, e]
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
      deterministic: unused (no dropout).

    Returns:
      [batch, seq, vocab] float32 logits.
    """
    text_embeds = self.llm.embed(input_ids)  # [batch, seq, embed]
    if image_features is None and images is not None:
      image_features = self.encode_images(images)
    if image_features is not None:
      text_embeds = merge_image_features(
          input_ids, text_embeds, image_features, self.config.image_token_id
      )
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
      prefix_len: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """A chunk of tokens through the LLM's KV cache (see `LLM.decode`).

    input_ids [batch, chunk]; image_features [batch, max_images, tokens, embed] from
    `encode_images`, merged at the chunk's image tokens (give them with the prompt);
    prefix_len [batch], cache slots of the bidirectional prefix (prefix LM) or None.
    Returns (float32 logits [batch, chunk, vocab], the updated cache).
    """
    text_embeds = self.llm.embed(input_ids)  # [batch, chunk, embed]
    if image_features is not None:
      text_embeds = merge_image_features(
          input_ids, text_embeds, image_features, self.config.image_token_id)
    return self.llm.decode(text_embeds, positions=positions, cache_mask=cache_mask,
                           cache=cache, write_index=write_index, prefix_len=prefix_len)


def dummy_inputs(config: VLMConfig, batch_size: int = 1, seq_len: int = 8) -> dict:
  """Zero inputs of the right shapes and dtypes for `VLM.init` (one image per example)."""
  size = config.vision.image_size
  return {
      'input_ids': jnp.zeros((batch_size, seq_len), jnp.int32),
      'images': jnp.zeros((batch_size, 1, size, size, 3), jnp.float32),
      'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch_size, seq_len)),
      'attention_mask': jnp.ones((batch_size, seq_len), jnp.int32),
  }


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
