"""ViT image encoders of the CLIP kind and the SigLIP kind, returning the features LLaVA uses.

CLIP: patch conv (no bias), class token, learned positions, pre-layernorm, quick_gelu MLP.
SigLIP: patch conv (with bias), no class token, learned positions, gelu-tanh MLP.
Both end in a post-layernorm that LLaVA does not use for its features (Hugging Face's
`hidden_states[i]` are the raw outputs of layer i); it is kept so checkpoints round-trip, and
`output='post_norm'` returns it (CLIP's pooled class token, SigLIP's `last_hidden_state`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvlm_jax.models import attention, layers
from openvlm_jax.models.config import LoraConfig, VisionConfig

ACTIVATION_NAMES = ('batch', 'length', 'embed')


def activation(name: str):
  """The MLP activation of a vision config."""
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f'unknown vision hidden_act {name!r}')


class VisionAttention(nn.Module):
  """Bidirectional multi-head attention with biases."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @nn.compact
  def __call__(self, hidden):
    """hidden [batch, tokens, embed] -> [batch, tokens, embed]."""
    cfg = self.config
    head_dim = cfg.hidden_size // cfg.num_heads
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype, 'use_bias': True,
          'lora': self.lora}
    qkv_kw = {'kernel_names': ('embed', 'heads', 'head_dim'), 'bias_names': ('heads', 'head_dim')}
    query = layers.dense((cfg.num_heads, head_dim), name='q_proj', **qkv_kw, **kw)(hidden)
    key = layers.dense((cfg.num_heads, head_dim), name='k_proj', **qkv_kw, **kw)(hidden)
    value = layers.dense((cfg.num_heads, head_dim), name='v_proj', **qkv_kw, **kw)(hidden)
    attended = attention.dot_product_attention(query, key, value, impl=self.attention_impl)
    return layers.dense(
        cfg.hidden_size, ('heads', 'head_dim', 'embed'), axis=(-2, -1), bias_names=('embed',),
        name='o_proj', **kw,
    )(attended)


class EncoderLayer(nn.Module):
  """One pre-norm ViT block.

  The carry is (hidden, selected): `selected` picks up this layer's output when it is the
  hidden state LLaVA reads (`feature_index`, 1-based over layers), so the features of an inner
  layer come out of `nn.scan` without stacking every layer's activations.
  """

  config: VisionConfig
  feature_index: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @nn.compact
  def __call__(self, carry, layer_index):
    """carry: two [batch, tokens, embed]; layer_index: int32 scalar (0-based)."""
    cfg = self.config
    hidden, selected = carry
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    normed = layers.layer_norm(cfg.layer_norm_eps, name='norm1', **kw)(hidden)
    hidden = hidden + VisionAttention(
        cfg, attention_impl=self.attention_impl, lora=self.lora, name='attention', **kw
    )(normed)
    normed = layers.layer_norm(cfg.layer_norm_eps, name='norm2', **kw)(hidden)
    up = layers.dense(
        cfg.intermediate_size, ('embed', 'mlp'), use_bias=True, bias_names=('mlp',), name='fc1',
        lora=self.lora, **kw,
    )(normed)
    up = nn.with_logical_constraint(activation(cfg.hidden_act)(up), ('batch', 'length', 'mlp'))
    hidden = hidden + layers.dense(
        cfg.hidden_size, ('mlp', 'embed'), use_bias=True, bias_names=('embed',), name='fc2',
        lora=self.lora, **kw
    )(up)
    hidden = nn.with_logical_constraint(hidden, ACTIVATION_NAMES)
    selected = jnp.where(layer_index + 1 == self.feature_index, hidden, selected)
    return (hidden, selected), None


_LAYER_IN_AXES = (0,)


class VisionTower(nn.Module):
  """Image encoder: images [batch, H, W, 3] -> features [batch, tokens, vision_embed]."""

  config: VisionConfig
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'
  scan_layers: bool = True
  attention_impl: str = 'xla'
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @property
  def feature_index(self) -> int:
    """Index of the hidden state LLaVA reads: 0 = embeddings, i = output of layer i."""
    num_hidden_states = self.config.num_layers + 1
    if not -num_hidden_states <= self.config.feature_layer < num_hidden_states:
      raise ValueError(
          f'feature_layer {self.config.feature_layer} is out of range for '
          f'{self.config.num_layers} layers'
      )
    return self.config.feature_layer % num_hidden_states

  def setup(self):
    cfg = self.config
    if cfg.kind not in ('clip', 'siglip'):
      raise ValueError(f"unknown vision kind {cfg.kind!r}; expected 'clip' or 'siglip'")
    is_clip = cfg.kind == 'clip'
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype}
    self.patch_embedding = nn.Conv(
        cfg.hidden_size,
        kernel_size=(cfg.patch_size, cfg.patch_size),
        strides=(cfg.patch_size, cfg.patch_size),
        padding='VALID',
        use_bias=not is_clip,
        kernel_init=nn.with_logical_partitioning(layers.kernel_init, (None, None, None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ('embed',)),
        **kw,
    )
    num_positions = cfg.num_patches + int(is_clip)
    self.position_embedding = self.param(
        'position_embedding',
        nn.with_logical_partitioning(layers.kernel_init, (None, 'embed')),
        (num_positions, cfg.hidden_size),
        self.param_dtype,
    )
    if is_clip:
      self.class_embedding = self.param(
          'class_embedding',
          nn.with_logical_partitioning(layers.kernel_init, ('embed',)),
          (cfg.hidden_size,),
          self.param_dtype,
      )
      self.pre_norm = layers.layer_norm(cfg.layer_norm_eps, **kw)
    self.layers = layers.make_layer_stack(
        EncoderLayer,
        num_layers=cfg.num_layers,
        scan=self.scan_layers,
        remat=self.remat,
        in_axes=_LAYER_IN_AXES,
        config=cfg,
        feature_index=self.feature_index,
        attention_impl=self.attention_impl,
        lora=self.lora,
        **kw,
    )
    self.post_norm = layers.layer_norm(cfg.layer_norm_eps, **kw)

  def __call__(self, images: jax.Array, *, output: str = 'features') -> jax.Array:
    """Encodes images.

    Args:
      images: [batch, height, width, 3] float32, already normalised with the config's
        image_mean/image_std.
      output: 'features' (LLaVA's: hidden state `feature_layer`, class token dropped when
        feature_select='default') or 'post_norm' (CLIP: the post-layernormed class token
        [batch, embed]; SigLIP: the post-layernormed last hidden state).

    Returns:
      features [batch, num_image_tokens, vision_embed] or the 'post_norm' output.
    """
    cfg = self.config
    is_clip = cfg.kind == 'clip'
    patches = self.patch_embedding(images.astype(self.dtype))  # [b, grid, grid, embed]
    batch = patches.shape[0]
    hidden = patches.reshape(batch, -1, cfg.hidden_size)  # [batch, patches, embed]
    if is_clip:
      class_token = jnp.broadcast_to(
          self.class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size)
      )
      hidden = jnp.concatenate([class_token, hidden], axis=1)
    hidden = hidden + self.position_embedding.astype(self.dtype)[None]
    if is_clip:
      hidden = self.pre_norm(hidden)
    hidden = nn.with_logical_constraint(hidden, ACTIVATION_NAMES)
    selected = hidden if self.feature_index == 0 else jnp.zeros_like(hidden)
    layer_indices = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    hidden, selected = layers.apply_layer_stack(
        self.layers, (hidden, selected), (layer_indices,), _LAYER_IN_AXES
    )
    post_normed = self.post_norm(hidden[:, 0] if is_clip else hidden)
    if output == 'post_norm':
      return post_normed
    if output != 'features':
      raise ValueError(f"unknown output {output!r}; expected 'features' or 'post_norm'")
    if cfg.feature_select == 'default' and is_clip:
      return selected[:, 1:]
    if cfg.feature_select not in ('default', 'full'):
      raise ValueError(f"unknown feature_select {cfg.feature_select!r}; expected 'default'|'full'")
    return selected
