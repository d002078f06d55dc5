"""Tiny random Hugging Face models for tests, built in-process (no downloads).

Every parameter, norms and biases included, is perturbed away from its initial value so a
wrongly mapped or dropped tensor changes the outputs.
"""

import numpy as np
import torch
import transformers

VOCAB_SIZE = 128
IMAGE_TOKEN_ID = 100
IMAGE_SIZE = 16
PATCH_SIZE = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2

# One torch thread: these models are tiny, and idle OpenMP threads spin-wait for cores that
# the parallel test workers and XLA need.
torch.set_num_threads(1)


def llama_config(rope_scaling: bool = False, **overrides) -> transformers.LlamaConfig:
  """A 2-layer GQA Llama (4 query heads, 2 kv heads), optionally with llama3 rope scaling."""
  rope = {'rope_type': 'default', 'rope_theta': 10000.0}
  if rope_scaling:
    rope = {
        'rope_type': 'llama3', 'rope_theta': 500000.0, 'factor': 8.0, 'low_freq_factor': 1.0,
        'high_freq_factor': 4.0, 'original_max_position_embeddings': 16,
    }
  kwargs = {
      'vocab_size': VOCAB_SIZE, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'rms_norm_eps': 1e-5, 'rope_parameters': rope,
      'max_position_embeddings': 256,
  }
  kwargs.update(overrides)
  return transformers.LlamaConfig(**kwargs)


def qwen2_config(**overrides) -> transformers.Qwen2Config:
  """A 2-layer Qwen2 (q/k/v biases) with tied embeddings."""
  kwargs = {
      'vocab_size': VOCAB_SIZE, 'hidden_size': 32, 'intermediate_size': 64, 'num_hidden_layers': 2,
      'num_attention_heads': 4, 'num_key_value_heads': 2, 'tie_word_embeddings': True,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': 1000000.0},
  }
  kwargs.update(overrides)
  return transformers.Qwen2Config(**kwargs)


def clip_vision_config() -> transformers.CLIPVisionConfig:
  """A 3-layer CLIP ViT on 16x16 images with 4x4 patches (16 patches + class token)."""
  return transformers.CLIPVisionConfig(
      hidden_size=24, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
  )


def siglip_vision_config(use_head: bool = True) -> transformers.SiglipVisionConfig:
  """A 2-layer SigLIP ViT on 16x16 images with 4x4 patches."""
  return transformers.SiglipVisionConfig(
      hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
      image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=use_head,
  )


def dinov2_config(image_size: int = 24) -> transformers.Dinov2Config:
  """A 3-layer DINOv2 ViT with 4x4 patches whose position table is for `image_size` images
  (6x6 patches by default: reading IMAGE_SIZE images resizes it, as real DINOv2 towers do
  at 224 px with a table for 518 px)."""
  return transformers.Dinov2Config(
      hidden_size=24, mlp_ratio=2, num_hidden_layers=3, num_attention_heads=2,
      image_size=image_size, patch_size=PATCH_SIZE, layerscale_value=0.5,
  )


def llava_config(text: str = 'llama', vision: str = 'clip') -> transformers.LlavaConfig:
  """LLaVA over a tiny decoder ('llama' | 'qwen2') and vision tower ('clip' | 'siglip' |
  'dinov2'; its folder needs an image processor cropping to IMAGE_SIZE, see
  `save_image_processor`)."""
  text_config = llama_config() if text == 'llama' else qwen2_config()
  if vision == 'clip':
    vision_config, feature_layer, select = clip_vision_config(), -2, 'default'
  elif vision == 'dinov2':
    vision_config, feature_layer, select = dinov2_config(), -2, 'default'
  else:
    vision_config, feature_layer, select = siglip_vision_config(use_head=False), -1, 'full'
  return transformers.LlavaConfig(
      text_config=text_config, vision_config=vision_config, image_token_index=IMAGE_TOKEN_ID,
      vision_feature_layer=feature_layer, vision_feature_select_strategy=select,
      image_seq_length=NUM_PATCHES, tie_word_embeddings=text_config.tie_word_embeddings,
  )


# LLaVA-NeXT grids for IMAGE_SIZE crops, as llava-v1.6's [[336, 672], [672, 336], ...] for 336.
PINPOINTS = [[16, 32], [32, 16], [32, 32], [48, 16], [16, 48]]


def llava_next_config(text: str = 'llama') -> transformers.LlavaNextConfig:
  """LLaVA-NeXT over a tiny decoder and CLIP tower, tiling images into IMAGE_SIZE crops."""
  llava = llava_config(text, 'clip')
  return transformers.LlavaNextConfig(
      text_config=llava.text_config, vision_config=llava.vision_config,
      image_token_index=IMAGE_TOKEN_ID, vision_feature_layer=-2,
      vision_feature_select_strategy='default', image_grid_pinpoints=PINPOINTS,
      tie_word_embeddings=llava.text_config.tie_word_embeddings,
  )


# LLaVA-OneVision's grids, 1x1 to 4x4 crops (its own go to 6x6 at 384 px).
ONEVISION_PINPOINTS = [[16 * i, 16 * j] for i in range(1, 5) for j in range(1, 5)]


def llava_onevision_config() -> transformers.LlavaOnevisionConfig:
  """LLaVA-OneVision over a tiny Qwen2 and SigLIP tower: anyres_max_9 on IMAGE_SIZE crops."""
  llava = llava_config('qwen2', 'siglip')
  return transformers.LlavaOnevisionConfig(
      text_config=llava.text_config, vision_config=llava.vision_config,
      image_token_index=IMAGE_TOKEN_ID, video_token_index=IMAGE_TOKEN_ID + 1,
      vision_feature_layer=-1, vision_feature_select_strategy='full',
      image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio='anyres_max_9',
      tie_word_embeddings=llava.text_config.tie_word_embeddings,
  )


def save_image_processor(folder, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)):
  """A CLIP-style image processor cropping to IMAGE_SIZE (what DINOv2 folders ship)."""
  transformers.CLIPImageProcessor(
      size={'shortest_edge': IMAGE_SIZE}, crop_size={'height': IMAGE_SIZE, 'width': IMAGE_SIZE},
      image_mean=list(mean), image_std=list(std)).save_pretrained(folder)


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
  """Adds N(0, scale) noise to every parameter (in place) and returns the model."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for param in model.parameters():
      param.add_(torch.randn(param.shape, generator=generator) * scale)
  return model


def build(model_cls, config, folder=None, seed: int = 0):
  """Instantiates `model_cls(config)` in float32 eager mode, perturbs it and saves it."""
  torch.manual_seed(seed)
  config._attn_implementation = 'eager'
  model = perturb(model_cls(config).float().eval(), seed)
  if folder is not None:
    model.save_pretrained(folder)
  return model


def random_images(rng: np.random.Generator, *shape: int) -> np.ndarray:
  """Normalised-looking images [*shape, IMAGE_SIZE, IMAGE_SIZE, 3] float32."""
  return rng.normal(size=(*shape, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def nchw(images: np.ndarray) -> torch.Tensor:
  """[n, H, W, 3] numpy -> [n, 3, H, W] torch."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def positions_from_mask(attention_mask: np.ndarray) -> np.ndarray:
  """HF's left-padding positions: cumsum(mask) - 1, clipped at 0."""
  return np.maximum(np.cumsum(attention_mask, axis=-1) - 1, 0).astype(np.int32)


def max_abs_diff_at(ours, theirs, attention_mask: np.ndarray) -> float:
  """Largest |ours - theirs| over real (unpadded) positions of [batch, seq, ...] arrays."""
  ours = np.asarray(ours, np.float32)
  theirs = np.asarray(theirs.detach().float().numpy() if torch.is_tensor(theirs) else theirs)
  keep = np.asarray(attention_mask).astype(bool)
  return float(np.max(np.abs(ours[keep] - theirs[keep])))
