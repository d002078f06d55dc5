"""ViT image encoders of the CLIP, SigLIP and DINOv2 kinds, returning the features LLaVA uses.

CLIP: patch conv (no bias), class token, learned positions, pre-layernorm, quick_gelu MLP.
SigLIP: patch conv (with bias), no class token, learned positions, gelu-tanh MLP.
DINOv2: patch conv (with bias), class token, learned positions on the checkpoint's grid
  (bicubically resized to the image's grid, as Hugging Face's Dinov2Model does), each
  residual branch scaled per channel (layer scale), gelu MLP.
All end in a post-layernorm that LLaVA does not use for its features (Hugging Face's
`hidden_states[i]` are the raw outputs of layer i); it is kept so checkpoints round-trip, and
`output='post_norm'` returns it (CLIP's pooled class token, SigLIP's and DINOv2's
`last_hidden_state`).
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out_size, in_size] weights of a 1-D bicubic resize as torch computes it.

  `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)`: source
  coordinate (i + 0.5) * in / out - 0.5 (not clamped), the cubic kernel with a = -0.75, taps
  beyond the edges clamped to the edge.
  """
  a = -0.75

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    source = (i + 0.5) * in_size / out_size - 0.5
    left = math.floor(source)
    t = source - left
    for offset, weight in zip((-1, 0, 1, 2), (far(t + 1), near(t), near(1 - t), far(2 - t))):
      weights[i, min(max(left + offset, 0), in_size - 1)] += weight
  return weights.astype(np.float32)


def resize_position_table(table: jax.Array, from_grid: int, to_grid: int) -> jax.Array:
  """Patch positions [from_grid**2, embed] -> [to_grid**2, embed], bicubic in float32."""
  if from_grid == to_grid:
    return table
  resize = jnp.asarray(bicubic_matrix(from_grid, to_grid))  # [to_grid, from_grid]
  grid = table.astype(jnp.float32).reshape(from_grid, from_grid, -1)
  resized = jnp.einsum('ih,hwd,jw->ijd', resize, grid, resize)
  return resized.reshape(to_grid * to_grid, -1).astype(table.dtype)


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
    attended = VisionAttention(
        cfg, attention_impl=self.attention_impl, lora=self.lora, name='attention', **kw
    )(normed)
    hidden = hidden + self._layer_scale('layer_scale1', attended)
    normed = layers.layer_norm(cfg.layer_norm_eps, name='norm2', **kw)(hidden)
    up = layers.dense(
        cfg.intermediate_size, ('embed', 'mlp'), use_bias=True, bias_names=('mlp',), name='fc1',
        lora=self.lora, **kw,
    )(normed)
    up = nn.with_logical_constraint(activation(cfg.hidden_act)(up), ('batch', 'length', 'mlp'))
    down = layers.dense(
        cfg.hidden_size, ('mlp', 'embed'), use_bias=True, bias_names=('embed',), name='fc2',
        lora=self.lora, **kw
    )(up)
    hidden = hidden + self._layer_scale('layer_scale2', down)
    hidden = nn.with_logical_constraint(hidden, ACTIVATION_NAMES)
    selected = jnp.where(layer_index + 1 == self.feature_index, hidden, selected)
    return (hidden, selected), None


  def _layer_scale(self, name: str, branch: jax.Array) -> jax.Array:
    """DINOv2's per-channel scale of a residual branch (other kinds have none)."""
    if self.config.kind != 'dinov2':
      return branch
    scale = self.param(name, nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (self.config.hidden_size,), self.param_dtype)
    return branch * scale.astype(branch.dtype)


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
    if cfg.kind not in ('clip', 'siglip', 'dinov2'):
      raise ValueError(f"unknown vision kind {cfg.kind!r}; expected 'clip', 'siglip' or "
                       "'dinov2'")
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
    num_positions = cfg.table_grid ** 2 + int(cfg.has_class_token)
    self.position_embedding = self.param(
        'position_embedding',
        nn.with_logical_partitioning(layers.kernel_init, (None, 'embed')),
        (num_positions, cfg.hidden_size),
        self.param_dtype,
    )
    if cfg.has_class_token:
      self.class_embedding = self.param(
          'class_embedding',
          nn.with_logical_partitioning(layers.kernel_init, ('embed',)),
          (cfg.hidden_size,),
          self.param_dtype,
      )
    if is_clip:
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
        [batch, embed]; SigLIP, DINOv2: the post-layernormed last hidden state).

    Returns:
      features [batch, num_image_tokens, vision_embed] or the 'post_norm' output.
    """
    cfg = self.config
    is_clip, has_class_token = cfg.kind == 'clip', cfg.has_class_token
    patches = self.patch_embedding(images.astype(self.dtype))  # [b, grid, grid, embed]
    batch = patches.shape[0]
    hidden = patches.reshape(batch, -1, cfg.hidden_size)  # [batch, patches, embed]
    if has_class_token:
      class_token = jnp.broadcast_to(
          self.class_embedding.astype(self.dtype), (batch, 1, cfg.hidden_size)
      )
      hidden = jnp.concatenate([class_token, hidden], axis=1)
    table = self.position_embedding  # [class token? + table_grid**2, embed]
    first_patch = int(has_class_token)
    positions = jnp.concatenate([table[:first_patch], resize_position_table(
        table[first_patch:], cfg.table_grid, cfg.grid)])
    hidden = hidden + positions.astype(self.dtype)[None]
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
    if cfg.feature_select == 'default' and has_class_token:
      return selected[:, 1:]
    if cfg.feature_select not in ('default', 'full'):
      raise ValueError(f"unknown feature_select {cfg.feature_select!r}; expected 'default'|'full'")
    return selected
