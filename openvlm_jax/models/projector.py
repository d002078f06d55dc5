"""Vision-to-language projectors of LLaVA: 'linear' and 'mlp2x_gelu' (LLaVA-1.5)."""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from openvlm_jax.models import layers
from openvlm_jax.models.config import LoraConfig

PROJECTOR_KINDS = ('linear', 'mlp2x_gelu')


class Projector(nn.Module):
  """Maps vision features [..., vision_embed] to the LLM's embedding size [..., embed].

  'linear': one Dense ('linear_1'). 'mlp2x_gelu': Dense ('linear_1'), exact GELU,
  Dense ('linear_2').
  """

  kind: str
  out_features: int
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  lora: LoraConfig | None = None  # adapters on the Dense layers it targets (lora.py)

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """features [..., vision_embed] -> [..., embed]."""
    if self.kind not in PROJECTOR_KINDS:
      raise ValueError(f'unknown projector {self.kind!r}; expected one of {PROJECTOR_KINDS}')
    kw = {'dtype': self.dtype, 'param_dtype': self.param_dtype, 'use_bias': self.use_bias,
          'lora': self.lora}
    if self.kind == 'linear':
      return layers.dense(
          self.out_features, (None, 'embed'), bias_names=('embed',), name='linear_1', **kw
      )(features)
    hidden = layers.dense(
        self.out_features, (None, 'mlp'), bias_names=('mlp',), name='linear_1', **kw
    )(features)
    hidden = jax.nn.gelu(hidden, approximate=False)
    return layers.dense(
        self.out_features, ('mlp', 'embed'), bias_names=('embed',), name='linear_2', **kw
    )(hidden)
