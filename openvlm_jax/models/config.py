"""Hyperparameters of the models: frozen dataclasses, hashable, so modules can hold them.

These are the only configuration the modules in `models/` read. `main.py` builds them from
the ml_collections config; `hf/` derives them from a Hugging Face `config.json`.
"""

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Rotary-embedding frequency scaling of the llama3 kind (Llama 3.1+)."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """A Llama-family decoder (Llama, Qwen2 with q/k/v biases, Mistral)."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: Optional[int] = None  # None: hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: Optional[RopeScaling] = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False  # Qwen2
  tie_embeddings: bool = False
  max_position_embeddings: int = 4096
  family: str = 'llama'  # 'llama' | 'qwen2' | 'mistral': the Hugging Face class it exports as

  @property
  def resolved_head_dim(self) -> int:
    return self.head_dim or self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """A ViT image encoder of the CLIP, SigLIP or DINOv2 kind."""

  # 'clip' (class token, pre-layernorm) | 'siglip' (no class token) | 'dinov2' (class token,
  # layer scale, position table interpolated to the image's grid)
  kind: str
  image_size: int  # what the tower reads; the number of image tokens follows from it
  patch_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  layer_norm_eps: float = 1e-5
  hidden_act: str = 'quick_gelu'  # 'quick_gelu' | 'gelu' | 'gelu_pytorch_tanh'
  feature_layer: int = -2  # index into hidden states (0 = embeddings), as in LLaVA
  feature_select: str = 'default'  # 'default' drops the class token, 'full' keeps all
  image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
  image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
  # Side of the learned position table's patch grid (DINOv2 checkpoints: 37 = 518 // 14);
  # 0: the image's own grid, image_size // patch_size.
  position_grid: int = 0

  @property
  def grid(self) -> int:
    """Patches along each side of the image."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid ** 2

  @property
  def table_grid(self) -> int:
    """Side of the position table's patch grid."""
    return self.position_grid or self.grid

  @property
  def has_class_token(self) -> bool:
    return self.kind in ('clip', 'dinov2')

  @property
  def num_image_tokens(self) -> int:
    """Tokens each image occupies in the LLM's sequence."""
    keeps_class_token = self.has_class_token and self.feature_select == 'full'
    return self.num_patches + int(keeps_class_token)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Low-rank adapters on the Dense layers whose parameter path matches one of `targets`."""

  rank: int = 0  # 0: no adapters
  alpha: float = 16.0  # the update is scaled by alpha / rank
  dropout: float = 0.0  # on the adapter's input, when a 'dropout' rng is given
  targets: tuple[str, ...] = ()  # regexes over module paths like 'llm/layers/attention/q_proj'
  base_dtype: str = 'float32'  # frozen base kernel of targets: 'float32' | 'bf16' | 'int8' | 'nf4'
  projection_impl: str = 'xla'  # what the layers get is VLMConfig.layer_lora's; see LoraDense
  # Put before a module's own path when matching `targets`: a layer applied on its own
  # (the KV-cache decoder's) names where its parameters sit, e.g. 'llm/layers/'.
  path_prefix: str = ''


@dataclasses.dataclass(frozen=True)
class VLMConfig:
  """A LLaVA-style model: vision tower -> projector -> decoder LLM."""

  llm: LLMConfig
  vision: VisionConfig
  projector: str = 'mlp2x_gelu'  # 'linear' | 'mlp2x_gelu'
  projector_bias: bool = True
  image_token_id: int = 3
  dtype: str = 'float32'  # compute dtype: 'float32' | 'bfloat16'
  param_dtype: str = 'float32'
  remat: str = 'none'  # 'none' | 'full' | 'dots' (save matmul outputs)
  scan_layers: bool = True
  attention_impl: str = 'xla'  # 'xla' | 'pallas' | 'cudnn'
  # Prefix LM (as PaliGemma): the tokens before the first answer token (image, system text,
  # first user turn, assistant header) attend to each other bidirectionally. Off: causal, as
  # LLaVA in transformers.
  prefix_attention: bool = False
  lora: Optional[LoraConfig] = None
  projection_impl: str = 'xla'  # LoRA Dense layers: 'xla' | 'pallas' (fused kernel)
  # LLaVA-NeXT anyres (data/anyres.py): the (height, width) grids an image may be tiled into,
  # in crops of the tower's image size; () is a single view per image (LLaVA-1.5).
  image_grid_pinpoints: tuple[tuple[int, int], ...] = ()
  # LLaVA-OneVision's anyres_max_N: crops' feature grids over ~N crops' worth are shrunk
  # bilinearly, and images of multi-image records get one untiled view; 0: LLaVA-NeXT.
  anyres_max_crops: int = 0

  @property
  def layer_lora(self) -> Optional[LoraConfig]:
    """The LoRA config the Dense layers get: `lora` with this model's `projection_impl`."""
    if self.lora is None:
      return None
    return dataclasses.replace(self.lora, projection_impl=self.projection_impl)
