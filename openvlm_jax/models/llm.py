"""A Llama-family decoder: Llama 2/3, Qwen2 (q/k/v biases), Mistral, one module with flags.

Embedding -> N x [RMSNorm -> GQA self-attention with RoPE -> residual, RMSNorm -> SwiGLU
MLP -> residual] -> RMSNorm -> lm_head (or the tied embedding). The attention keeps the q/k/v
projection, the attention itself and the output projection as separate methods so that a
KV cache can sit between them.
"""

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax.models import attention, layers
from openvlm_jax.models.config import LLMConfig, LoraConfig, RopeScaling

ACTIVATION_NAMES = ('batch', 'length', 'embed')


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position ids that skip left padding: cumsum(mask != 0) - 1, clipped at 0. [batch, seq].

  One example per row; a packed row brings its own positions (restarting in each segment).
  """
  real = (attention_mask != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(real, axis=-1) - 1, 0)


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies of the rotary embedding, [head_dim // 2] float32.

  With `scaling`, applies the llama3 rule: long wavelengths are divided by `factor`, short
  ones kept, and the band in between interpolated smoothly.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (np.float32(1.0) / np.power(np.float32(theta), exponents)).astype(np.float32)
  if scaling is None:
    return inv_freq
  old_context = np.float32(scaling.original_max_position_embeddings)
  low_freq_wavelen = old_context / np.float32(scaling.low_freq_factor)
  high_freq_wavelen = old_context / np.float32(scaling.high_freq_factor)
  wavelen = np.float32(2 * math.pi) / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(scaling.factor), inv_freq)
  smooth = (old_context / wavelen - np.float32(scaling.low_freq_factor)) / np.float32(
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / np.float32(scaling.factor) + smooth * scaled
  is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """cos and sin tables for `positions` [batch, seq]; each [batch, seq, head_dim] float32."""
  freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, s, d/2]
  angles = jnp.concatenate([freqs, freqs], axis=-1)  # [batch, seq, head_dim]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [batch, seq, heads, head_dim] (Hugging Face's rotate_half convention)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


class SelfAttention(nn.Module):
  """Grouped-query self-attention with RoPE and optional q/k/v biases."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  def setup(self):
    cfg = self.config
    head_dim = cfg.resolved_head_dim
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype, 'lora': self.lora}
    self.q_proj = layers.dense(
        (cfg.num_heads, head_dim), ('embed', 'heads', 'head_dim'), use_bias=cfg.qkv_bias,
        bias_names=('heads', 'head_dim'), name='q_proj', **kw)
    self.k_proj = layers.dense(
        (cfg.num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
        bias_names=('kv_heads', 'head_dim'), name='k_proj', **kw)
    self.v_proj = layers.dense(
        (cfg.num_kv_heads, head_dim), ('embed', 'kv_heads', 'head_dim'), use_bias=cfg.qkv_bias,
        bias_names=('kv_heads', 'head_dim'), name='v_proj', **kw)
    self.o_proj = layers.dense(
        cfg.hidden_size, ('heads', 'head_dim', 'embed'), axis=(-2, -1), name='o_proj', **kw)

  def project_qkv(self, hidden, cos, sin):
    """Returns rotated query [b, s, heads, d] and rotated key, value [b, s, kv_heads, d]."""
    query = apply_rope(self.q_proj(hidden), cos, sin)
    key = apply_rope(self.k_proj(hidden), cos, sin)
    value = self.v_proj(hidden)
    return query, key, value

  def __call__(self, hidden, cos, sin, mask):
    """hidden [batch, seq, embed] -> [batch, seq, embed]."""
    query, key, value = self.project_qkv(hidden, cos, sin)
    attended = attention.dot_product_attention(
        query, key, value, mask=mask, impl=self.attention_impl
    )  # [batch, seq, heads, head_dim]
    return self.o_proj(attended)

  def attend_cached(self, hidden, cos, sin, mask, key_cache, value_cache, write_index):
    """Attention over a KV cache after writing this chunk's keys and values into it.

    hidden [b, s, embed]; mask [b, 1, s, cache_len]; key_cache, value_cache
    [b, cache_len, kv_heads, d]; the chunk goes to cache slots write_index .. write_index + s.
    Returns ([b, s, embed], (key_cache, value_cache)).
    """
    query, key, value = self.project_qkv(hidden, cos, sin)
    start = (0, write_index, 0, 0)
    key_cache = jax.lax.dynamic_update_slice(key_cache, key.astype(key_cache.dtype), start)
    value_cache = jax.lax.dynamic_update_slice(value_cache, value.astype(value_cache.dtype), start)
    attended = attention.dot_product_attention(
        query, key_cache, value_cache, mask=mask, impl=self.attention_impl)
    return self.o_proj(attended), (key_cache, value_cache)


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x))."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @nn.compact
  def __call__(self, hidden):
    """hidden [batch, seq, embed] -> [batch, seq, embed]."""
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype, 'lora': self.lora}
    mlp_size = self.config.intermediate_size
    gate = layers.dense(mlp_size, ('embed', 'mlp'), name='gate_proj', **kw)(hidden)
    up = layers.dense(mlp_size, ('embed', 'mlp'), name='up_proj', **kw)(hidden)
    gated = nn.with_logical_constraint(nn.silu(gate) * up, ('batch', 'length', 'mlp'))
    return layers.dense(self.config.hidden_size, ('mlp', 'embed'), name='down_proj', **kw)(gated)


class DecoderLayer(nn.Module):
  """One pre-norm decoder block; `__call__` has the (carry, out) form `nn.scan` expects."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @nn.compact
  def __call__(self, hidden, cos, sin, mask, cache=None):
    """hidden [batch, seq, embed], cos/sin [batch, seq, head_dim], mask [b, 1, seq, seq].

    With `cache = (key_cache, value_cache, write_index)` (see `SelfAttention.attend_cached`)
    the mask spans the cache, [b, 1, seq, cache_len], and the updated (key_cache,
    value_cache) is returned in place of None.
    """
    cfg = self.config
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    normed = layers.rms_norm(cfg.rms_norm_eps, name='input_norm', **kw)(hidden)
    self_attention = SelfAttention(cfg, attention_impl=self.attention_impl, lora=self.lora,
                                   name='attention', **kw)
    if cache is None:
      attended, new_cache = self_attention(normed, cos, sin, mask), None
    else:
      attended, new_cache = self_attention.attend_cached(normed, cos, sin, mask, *cache)
    hidden = hidden + attended
    normed = layers.rms_norm(cfg.rms_norm_eps, name='post_attention_norm', **kw)(hidden)
    hidden = hidden + SwiGLU(cfg, lora=self.lora, name='mlp', **kw)(normed)
    return nn.with_logical_constraint(hidden, ACTIVATION_NAMES), new_cache


_LAYER_IN_AXES = (nn.broadcast, nn.broadcast, nn.broadcast)


class LLM(nn.Module):
  """Decoder-only language model; returns float32 logits."""

  config: LLMConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'
  scan_layers: bool = True
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  def setup(self):
    cfg = self.config
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    self.embed_tokens = nn.Embed(
        cfg.vocab_size,
        cfg.hidden_size,
        embedding_init=nn.with_logical_partitioning(layers.kernel_init, ('vocab', 'embed')),
        **kw,
    )
    self.layers = layers.make_layer_stack(
        DecoderLayer,
        num_layers=cfg.num_layers,
        scan=self.scan_layers,
        remat=self.remat,
        in_axes=_LAYER_IN_AXES,
        config=cfg,
        attention_impl=self.attention_impl,
        lora=self.lora,
        **kw,
    )
    self.final_norm = layers.rms_norm(cfg.rms_norm_eps, **kw)
    if not cfg.tie_embeddings:
      self.lm_head = layers.dense(cfg.vocab_size, ('embed', 'vocab'), lora=self.lora, **kw)
    self.inv_freq = rope_inv_freq(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """Token embeddings: input_ids [batch, seq] -> [batch, seq, embed] in the compute dtype."""
    return self.embed_tokens(input_ids)

  def __call__(
      self,
      input_ids: jax.Array | None = None,
      *,
      inputs_embeds: jax.Array | None = None,
      positions: jax.Array | None = None,
      attention_mask: jax.Array,
      prefix_len: jax.Array | None = None,
      prefix_end: jax.Array | None = None,
      deterministic: bool = True,
  ) -> jax.Array:
    """Logits of the next token at every position.

    Args:
      input_ids: [batch, seq] int32; or give `inputs_embeds` instead.
      inputs_embeds: [batch, seq, embed] (e.g. text embeddings with image features merged).
      positions: [batch, seq] rotary positions; default `positions_from_mask(attention_mask)`.
      attention_mask: [batch, seq] segment ids: 1 at real tokens and 0 at padding, or 1, 2,
        ... for the examples packed into a row (give their `positions`); or a full boolean
        mask [batch, 1 or heads, seq, seq].
      prefix_len: optional [batch] int (prefix LM, one example per row): positions
        < prefix_len[b] attend to each other bidirectionally, the rest causally.
      prefix_end: optional [batch, seq] int (prefix LM, per token, packed rows too): query i
        also sees keys j < prefix_end[b, i] of its segment. Not with `prefix_len`.
      deterministic: unused (no dropout), kept for a uniform model signature.

    Returns:
      [batch, seq, vocab] float32 logits.
    """
    del deterministic
    if inputs_embeds is None:
      if input_ids is None:
        raise ValueError('give input_ids or inputs_embeds')
      inputs_embeds = self.embed(input_ids)
    hidden = nn.with_logical_constraint(inputs_embeds.astype(self.dtype), ACTIVATION_NAMES)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    cos, sin = rope_cos_sin(positions, self.inv_freq)
    if prefix_len is not None:
      if prefix_end is not None:
        raise ValueError('give prefix_len or prefix_end, not both')
      prefix_end = attention.prefix_end_from_len(prefix_len, attention_mask.shape[1])
    if attention_mask.ndim == 2:
      mask = attention.decoder_mask(attention_mask, self.attention_impl, prefix_end)
    elif prefix_end is not None:
      raise ValueError('a prefix needs a [batch, seq] attention_mask, not a full mask')
    else:
      mask = attention_mask.astype(jnp.bool_)
    hidden = layers.apply_layer_stack(self.layers, hidden, (cos, sin, mask), _LAYER_IN_AXES)
    return self.project_to_vocab(hidden)

  def project_to_vocab(self, hidden: jax.Array) -> jax.Array:
    """Final norm and lm_head (or the tied embedding): [b, s, embed] -> float32 [b, s, vocab]."""
    hidden = self.final_norm(hidden)
    if self.config.tie_embeddings:
      logits = self.embed_tokens.attend(hidden)
    else:
      logits = self.lm_head(hidden)
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab')).astype(jnp.float32)

  def decode(
      self,
      inputs_embeds: jax.Array,
      *,
      positions: jax.Array,
      cache_mask: jax.Array,
      cache: dict,
      write_index: jax.Array,
      prefix_len: jax.Array | None = None,
  ) -> tuple[jax.Array, dict]:
    """Runs a chunk of tokens against a KV cache (prefill, then one token at a time).

    Args:
      inputs_embeds: [batch, chunk, embed], the chunk's embeddings.
      positions: [batch, chunk] rotary positions.
      cache_mask: [batch, cache_len], 1 at cache slots holding real tokens once this chunk is
        written (left padding of the prompt stays 0).
      cache: `{'key', 'value'}` each [layers, batch, cache_len, kv_heads, head_dim] (see
        `init_cache`); layer l reads slice l.
      write_index: int32 scalar, the cache slot of the chunk's first token.
      prefix_len: optional [batch] int (prefix LM): cache slots < prefix_len[b] attend to
        each other bidirectionally, later slots causally; as in `__call__` over the cache.

    Returns:
      (float32 logits [batch, chunk, vocab], the updated cache).
    """
    cfg = self.config
    hidden = inputs_embeds.astype(self.dtype)
    cos, sin = rope_cos_sin(positions, self.inv_freq)
    chunk, cache_len = hidden.shape[1], cache['key'].shape[2]
    query_slots = write_index + jnp.arange(chunk)  # [chunk]
    allowed = attention.prefix_causal_mask(
        query_slots, jnp.arange(cache_len), prefix_len)  # [batch or 1, 1, chunk, cache_len]
    mask = allowed & cache_mask.astype(jnp.bool_)[:, None, None, :]  # [b, 1, chunk, cache_len]
    params = self.variables['params']

    def run_layer(hidden, layer_params, key_cache, value_cache, name='layers'):
      # A free-standing layer; its LoRA targets are matched at the params' own path.
      lora = self.lora and dataclasses.replace(
          self.lora, path_prefix='/'.join(self.path + (name,)) + '/')
      layer = DecoderLayer(cfg, dtype=self.dtype, param_dtype=self.param_dtype,
                           attention_impl=self.attention_impl, lora=lora, parent=None)
      return layer.apply({'params': layer_params}, hidden, cos, sin, mask,
                         cache=(key_cache, value_cache, write_index))

    if self.scan_layers:
      def body(hidden, layer_inputs):
        hidden, layer_cache = run_layer(hidden, *layer_inputs)
        return hidden, layer_cache
      hidden, (keys, values) = jax.lax.scan(
          body, hidden, (params['layers'], cache['key'], cache['value']))
    else:
      keys, values = [], []
      for index in range(cfg.num_layers):
        hidden, (key, value) = run_layer(hidden, params[f'layers_{index}'],
                                         cache['key'][index], cache['value'][index],
                                         name=f'layers_{index}')
        keys.append(key)
        values.append(value)
      keys, values = jnp.stack(keys), jnp.stack(values)
    return self.project_to_vocab(hidden), {'key': keys, 'value': values}


def init_cache(config: LLMConfig, batch_size: int, cache_len: int, dtype: Any = jnp.float32) -> dict:
  """An empty KV cache: `{'key', 'value'}` each [layers, batch, cache_len, kv_heads, head_dim]."""
  shape = (config.num_layers, batch_size, cache_len, config.num_kv_heads, config.resolved_head_dim)
  return {'key': jnp.zeros(shape, dtype), 'value': jnp.zeros(shape, dtype)}
