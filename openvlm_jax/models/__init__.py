"""Flax linen models: the decoder LLM, the vision tower, the projector and the VLM."""

from openvlm_jax.models.attention import dot_product_attention, make_causal_mask
from openvlm_jax.models.config import LLMConfig, RopeScaling, VisionConfig, VLMConfig
from openvlm_jax.models.llm import LLM, positions_from_mask
from openvlm_jax.models.projector import Projector
from openvlm_jax.models.vision import VisionTower
from openvlm_jax.models.vlm import VLM, dummy_inputs, init_params, merge_image_features

__all__ = [
    'LLM',
    'VLM',
    'LLMConfig',
    'Projector',
    'RopeScaling',
    'VLMConfig',
    'VisionConfig',
    'VisionTower',
    'dot_product_attention',
    'dummy_inputs',
    'init_params',
    'make_causal_mask',
    'merge_image_features',
    'positions_from_mask',
]
