"""Read and write Hugging Face checkpoint folders (config.json + safetensors).

Reading goes tensor by tensor through `safetensors.safe_open`, so with `shardings` each
parameter is put on its devices as soon as it is assembled and the host holds about one
parameter at a time. Writing streams the same way: the shards are planned from the shapes,
then each tensor is converted, written and dropped. Only safetensors are read: no pickle, no
remote code.
"""

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import transformers
from safetensors import safe_open
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from openvlm_jax.console import UserError
from openvlm_jax.hf import config as hf_config
from openvlm_jax.hf import convert
from openvlm_jax.models import layers as model_layers
from openvlm_jax.models import lora as lora_lib
from openvlm_jax.models.config import LLMConfig, VisionConfig, VLMConfig
from openvlm_jax.models.projector import Projector

INDEX_FILE = 'model.safetensors.index.json'
SAVE_DTYPES = {'float32': np.dtype(np.float32), 'bfloat16': np.dtype(ml_dtypes.bfloat16)}
SAFETENSORS_DTYPES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16'}


class SafetensorsReader(Mapping):
  """Lazy mapping HF tensor name -> numpy array over a folder's safetensors files.

  Handles one `model.safetensors`, a sharded set with `model.safetensors.index.json`, or any
  `*.safetensors` files. bfloat16 tensors come back as `ml_dtypes.bfloat16` arrays. Each read
  opens its file anew: an open file stays memory-mapped, and the pages read through it would
  stay resident, a second copy of the checkpoint by the end of a load.
  """

  def __init__(self, folder: str | os.PathLike):
    folder = Path(folder)
    index_path = folder / INDEX_FILE
    if index_path.exists():
      weight_map = json.loads(index_path.read_text())['weight_map']
      files = sorted(set(weight_map.values()))
    else:
      files = sorted(path.name for path in folder.glob('*.safetensors'))
      weight_map = None
    if not files:
      raise UserError(f'{folder}: no *.safetensors files (only safetensors are supported)')
    self._folder = folder
    if weight_map is None:
      weight_map = {}
      for name in files:
        with safe_open(folder / name, framework='numpy') as handle:
          weight_map.update(dict.fromkeys(handle.keys(), name))
    self._file_of = weight_map

  def __getitem__(self, name: str) -> np.ndarray:
    with safe_open(self._folder / self._file_of[name], framework='numpy') as handle:
      return handle.get_tensor(name)

  def __iter__(self) -> Iterator[str]:
    return iter(self._file_of)

  def __len__(self) -> int:
    return len(self._file_of)


class GrownVocabReader(Mapping):
  """A decoder's tensors with `embed_tokens` and `lm_head` grown to `vocab_size` rows.

  Each new row is the mean of the checkpoint's rows, as LLaVA initialises the embeddings
  of tokens it adds (`<image>`, `<pad>`); every other tensor passes through unchanged.
  """

  def __init__(self, reader: Mapping, vocab_size: int):
    self._reader, self._vocab_size = reader, vocab_size

  def __getitem__(self, name: str) -> np.ndarray:
    tensor = self._reader[name]
    if name.endswith(('embed_tokens.weight', 'lm_head.weight')):  # [vocab, hidden] both
      extra = self._vocab_size - tensor.shape[0]
      mean_row = tensor.astype(np.float32).mean(axis=0, keepdims=True).astype(tensor.dtype)
      tensor = np.concatenate([tensor, np.repeat(mean_row, extra, axis=0)])
    return tensor

  def __iter__(self) -> Iterator[str]:
    return iter(self._reader)

  def __len__(self) -> int:
    return len(self._reader)


def _read_json(path: Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def _read_preprocessor(folder: Path) -> dict | None:
  """The image processor's settings: preprocessor_config.json, or the `image_processor`
  entry of processor_config.json (where transformers >= 5 saves a processor's)."""
  preprocessor = _read_json(folder / 'preprocessor_config.json')
  if preprocessor is None:
    preprocessor = (_read_json(folder / 'processor_config.json') or {}).get('image_processor')
  return preprocessor


def _placer(shardings: Any, root: tuple[str, ...] = ()) -> convert.PlaceFn:
  """place(path, array): `jax.device_put` with the sharding at root + path, if any."""

  def place(path, array):
    sharding = None
    if shardings is not None:
      sharding = shardings
      for key in root + path:
        sharding = sharding[key]
    return jax.device_put(array, sharding)

  return place


def load_pretrained(
    folder: str | os.PathLike, *, shardings: Any = None, **overrides: Any
) -> tuple[VLMConfig | LLMConfig | VisionConfig, dict]:
  """Loads a Hugging Face checkpoint folder into our config and unboxed params.

  Args:
    folder: holds config.json (LLaVA, Llama/Qwen2/Mistral, or CLIP/SigLIP vision), the
      safetensors, and optionally preprocessor_config.json or processor_config.json
      (image mean/std).
    shardings: optional pytree of `jax.sharding.Sharding` matching the params; each
      parameter is placed with it as soon as it is read.
    **overrides: VLMConfig fields for a LLaVA checkpoint (dtype, remat, scan_layers, ...).

  Returns:
    (config, params): params is {'vision', 'projector', 'llm'} for LLaVA, else the bare
    decoder's or vision tower's params (scanned layers).
  """
  folder = Path(folder)
  raw_config = _read_json(folder / 'config.json')
  if raw_config is None:
    raise UserError(f'{folder}: config.json is missing')
  preprocessor = _read_preprocessor(folder)
  if raw_config.get('model_type') in hf_config.LLAVA_MODEL_TYPES:
    config = hf_config.vlm_config_from_hf(raw_config, preprocessor, **overrides)
  elif overrides:
    raise UserError(f'config overrides {sorted(overrides)} apply to LLaVA checkpoints only')
  else:
    config = hf_config.config_from_hf(raw_config, preprocessor)
  params = convert.hf_to_params(SafetensorsReader(folder), config, place=_placer(shardings))
  return config, params


def load_llm_and_vision(
    llm_folder: str | os.PathLike,
    vision_folder: str | os.PathLike,
    *,
    image_token_id: int,
    rng: jax.Array,
    projector: str = 'mlp2x_gelu',
    vocab_size: int | None = None,
    shardings: Any = None,
    **overrides: Any,
) -> tuple[VLMConfig, dict]:
  """A VLM from a pretrained decoder and a pretrained vision encoder, with a fresh projector.

  This is the stage-1 (projector pre-training) starting point of LLaVA.

  Args:
    llm_folder: a Llama/Qwen2/Mistral *ForCausalLM checkpoint folder.
    vision_folder: a CLIP/SigLIP (vision) checkpoint folder.
    image_token_id: id of the image placeholder token in the decoder's vocabulary.
    rng: key for the projector's initialisation.
    projector: 'mlp2x_gelu' | 'linear'.
    vocab_size: rows of the embedding (and lm_head), e.g. `len(tokenizer)` after
      `tokenizer.add_missing_tokens`; rows past the checkpoint's are initialised to the mean
      of its rows (`GrownVocabReader`). None keeps the checkpoint's vocabulary.
    shardings: optional pytree of shardings matching {'vision', 'projector', 'llm'}.
    **overrides: other VLMConfig fields (dtype, remat, projector_bias, ...).

  Returns:
    (VLMConfig, params).
  """
  llm_folder, vision_folder = Path(llm_folder), Path(vision_folder)
  config = load_stage1_config(llm_folder, vision_folder, image_token_id=image_token_id,
                              projector=projector, vocab_size=vocab_size, **overrides)
  llm_config, vision_config = config.llm, config.vision
  llm_reader = SafetensorsReader(llm_folder)
  if llm_config.vocab_size > _llm_vocab_size(llm_folder):
    llm_reader = GrownVocabReader(llm_reader, llm_config.vocab_size)
  params = {}
  for name, reader, part_config in (
      ('llm', llm_reader, llm_config),
      ('vision', SafetensorsReader(vision_folder), vision_config),
  ):
    params[name] = convert.hf_to_params(
        reader, part_config, scan_layers=config.scan_layers,
        param_dtype=config.param_dtype, place=_placer(shardings, (name,)),
    )
  projector_module = Projector(
      projector, llm_config.hidden_size, use_bias=config.projector_bias,
      param_dtype=model_layers.to_dtype(config.param_dtype),
  )
  features = jnp.zeros((1, 1, vision_config.hidden_size), jnp.float32)
  fresh = nn.unbox(projector_module.init(rng, features))['params']
  place = _placer(shardings, ('projector',))
  params['projector'] = jax.tree_util.tree_map_with_path(
      lambda path, value: place(tuple(key.key for key in path), value), fresh
  )
  return config, params


def parse_size(size: int | str) -> int:
  """Bytes of a size given as an int or a string like '5GB', '200MB', '10KB'."""
  if isinstance(size, int):
    return size
  match = re.fullmatch(r'\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B)?\s*', size, re.IGNORECASE)
  if not match:
    raise UserError(f'cannot parse size {size!r}; use e.g. 5GB or 200MB')
  units = {'': 1, 'B': 1, 'KB': 10**3, 'MB': 10**6, 'GB': 10**9,
           'KIB': 2**10, 'MIB': 2**20, 'GIB': 2**30}
  return int(float(match.group(1)) * units[(match.group(2) or '').upper()])


def save_pretrained(
    config: VLMConfig | LLMConfig,
    params: Mapping,
    folder: str | os.PathLike,
    *,
    dtype: str = 'float32',
    max_shard_size: int | str = '5GB',
) -> None:
  """Writes a folder that `LlavaForConditionalGeneration.from_pretrained` (or, for an
  LLMConfig, `AutoModelForCausalLM.from_pretrained`) loads with no missing or unexpected keys.

  Args:
    config: our config of `params`.
    params: unboxed params (numpy or jax arrays; scanned or unrolled layers).
    folder: created if needed; config.json and *.safetensors are written into it.
    dtype: 'float32' | 'bfloat16' for the stored tensors (and config.json's dtype).
    max_shard_size: bytes (or '5GB'); larger models are split into
      model-0000k-of-0000n.safetensors with model.safetensors.index.json.
  """
  if dtype not in SAVE_DTYPES:
    raise UserError(f'dtype {dtype!r} not one of {sorted(SAVE_DTYPES)}')
  if getattr(config, 'lora', None) is not None:  # merged: W + A B * alpha / rank, dequantized
    params = lora_lib.merge_params(params, config.lora)
    config = dataclasses.replace(config, lora=None)
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if isinstance(config, VLMConfig):
    exported = hf_config.vlm_config_to_hf(config)
  else:
    exported = hf_config.llm_config_to_hf(config)
    exported.architectures = [hf_config.CAUSAL_LM_CLASSES[config.family]]
  exported.dtype = dtype
  exported.save_pretrained(folder)

  limit = parse_size(max_shard_size)
  save_dtype = SAVE_DTYPES[dtype]
  for stale in [*folder.glob('model*.safetensors'), folder / INDEX_FILE]:
    stale.unlink(missing_ok=True)
  # Pass 1, over zero-strided stand-ins (no data): every tensor's name and shape, in shards.
  stand_ins = jax.tree.map(lambda leaf: np.broadcast_to(np.zeros((), leaf.dtype), leaf.shape),
                           dict(params))
  shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
  shard_bytes = total_bytes = 0
  for name, tensor in convert.iter_hf_tensors(stand_ins, config):
    num_bytes = tensor.size * save_dtype.itemsize
    if shards[-1] and shard_bytes + num_bytes > limit:
      shards.append([])
      shard_bytes = 0
    shards[-1].append((name, tensor.shape))
    shard_bytes += num_bytes
    total_bytes += num_bytes
  file_names = ['model.safetensors'] if len(shards) == 1 else [
      f'model-{number:05d}-of-{len(shards):05d}.safetensors'
      for number in range(1, len(shards) + 1)]
  # Pass 2: each tensor is converted, written and dropped; the host holds one at a time.
  tensors = convert.iter_hf_tensors(params, config)
  for file_name, shard in zip(file_names, shards):
    with open(folder / file_name, 'wb') as file:
      _write_safetensors_header(file, shard, save_dtype)
      for name, shape in shard:
        found, tensor = next(tensors)
        if (found, tuple(tensor.shape)) != (name, tuple(shape)):
          raise RuntimeError(f'export order changed: {found} {tensor.shape} for {name} {shape}')
        np.ascontiguousarray(tensor, dtype=save_dtype).tofile(file)
  if len(shards) > 1:
    index = {
        'metadata': {'total_size': total_bytes},
        'weight_map': {name: file_name for file_name, shard in zip(file_names, shards)
                       for name, _ in shard},
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))


def _write_safetensors_header(file: BinaryIO, shard: list[tuple[str, tuple[int, ...]]],
                              dtype: np.dtype) -> None:
  """The safetensors header (little-endian u64 length, JSON) of `shard`'s tensors, in order."""
  header: dict[str, Any] = {'__metadata__': {'format': 'pt'}}
  offset = 0
  for name, shape in shard:
    num_bytes = math.prod(shape) * dtype.itemsize
    header[name] = {'dtype': SAFETENSORS_DTYPES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + num_bytes]}
    offset += num_bytes
  encoded = json.dumps(header, separators=(',', ':')).encode()
  encoded += b' ' * (-len(encoded) % 8)  # the data starts 8-byte aligned
  file.write(struct.pack('<Q', len(encoded)) + encoded)


def save_processor(
    folder: str | os.PathLike,
    tokenizer: Any,
    vision_config: VisionConfig,
    *,
    image_token: str = '<image>',
    image_grid_pinpoints: Sequence[Sequence[int]] = (),
    anyres_max_crops: int = 0,
) -> Any:
  """Writes a LlavaProcessor (image processor + `tokenizer`) so `AutoProcessor` loads it.

  The image processor resizes to the tower's image size and normalises with the config's
  mean/std: CLIP-style (shortest edge + center crop; CLIP, DINOv2) or SigLIP-style (square
  resize). The processor expands each image token to exactly
  `vision_config.num_image_tokens` tokens.

  With `image_grid_pinpoints` it is a LlavaNextProcessor, which tiles as `data.anyres` does
  and writes each image's own token count. With `anyres_max_crops` too (OneVision) only the
  LlavaOnevisionImageProcessor and the tokenizer are written: transformers builds a
  LlavaOnevisionProcessor only with torchvision, for its video processor.
  Returns the processor (the image processor for OneVision).
  """
  size = vision_config.image_size
  common = {
      'image_mean': list(vision_config.image_mean),
      'image_std': list(vision_config.image_std),
  }
  has_class_token = vision_config.has_class_token
  tokens = dict(patch_size=vision_config.patch_size,
                vision_feature_select_strategy=vision_config.feature_select if has_class_token
                else 'full',
                num_additional_image_tokens=int(has_class_token), image_token=image_token)
  pinpoints = [list(map(int, pinpoint)) for pinpoint in image_grid_pinpoints]
  if pinpoints and anyres_max_crops:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={'height': size, 'width': size}, image_grid_pinpoints=pinpoints, **common)
    image_processor.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return image_processor
  if pinpoints:
    image_processor = LlavaNextImageProcessorPil(
        size={'shortest_edge': size}, crop_size={'height': size, 'width': size},
        image_grid_pinpoints=pinpoints, **common)
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, **tokens)
  else:
    if has_class_token:  # CLIP, DINOv2
      image_processor = transformers.CLIPImageProcessor(
          size={'shortest_edge': size}, crop_size={'height': size, 'width': size},
          do_center_crop=True, **common)
    else:
      image_processor = transformers.SiglipImageProcessor(
          size={'height': size, 'width': size}, **common)
    processor = transformers.LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, **tokens)
  processor.save_pretrained(folder)
  return processor


def load_config(folder: str | os.PathLike, **overrides: Any) -> VLMConfig:
  """The VLMConfig of a LLaVA checkpoint folder, without reading its weights."""
  folder = Path(folder)
  raw_config = _read_json(folder / 'config.json')
  if raw_config is None:
    raise UserError(f'{folder}: config.json is missing')
  if raw_config.get('model_type') not in hf_config.LLAVA_MODEL_TYPES:
    raise UserError(f"{folder}/config.json: model_type {raw_config.get('model_type')!r} is not "
                    f"one of {hf_config.LLAVA_MODEL_TYPES}; for a bare decoder and vision tower "
                    "use llm_from + vision_from")
  return hf_config.vlm_config_from_hf(
      raw_config, _read_preprocessor(folder), **overrides)


def _llm_vocab_size(llm_folder: Path) -> int:
  return int(_read_json(llm_folder / 'config.json')['vocab_size'])


def load_stage1_config(llm_folder: str | os.PathLike, vision_folder: str | os.PathLike, *,
                       image_token_id: int, projector: str = 'mlp2x_gelu',
                       vocab_size: int | None = None, **overrides: Any) -> VLMConfig:
  """The VLMConfig of a decoder folder plus a vision-tower folder (no weights read).

  `vocab_size` larger than the decoder's grows its vocabulary (see `load_llm_and_vision`).
  """
  llm_folder, vision_folder = Path(llm_folder), Path(vision_folder)
  llm = hf_config.llm_config_from_hf(_read_json(llm_folder / 'config.json'))
  if vocab_size is not None and vocab_size > llm.vocab_size:
    llm = dataclasses.replace(llm, vocab_size=vocab_size)
  return VLMConfig(
      llm=llm,
      vision=hf_config.vision_config_from_hf(
          _read_json(vision_folder / 'config.json'),
          preprocessor=_read_preprocessor(vision_folder)),
      projector=projector, image_token_id=image_token_id, **overrides)


def export_folder(folder: str | os.PathLike, config: VLMConfig, params: Mapping, tokenizer: Any,
                  *, dtype: str = 'float32', max_shard_size: int | str = '5GB') -> None:
  """A complete Hugging Face LLaVA folder: config, safetensors, tokenizer and processor."""
  save_pretrained(config, params, folder, dtype=dtype, max_shard_size=max_shard_size)
  image_token = tokenizer.convert_ids_to_tokens(config.image_token_id)
  save_processor(folder, tokenizer, config.vision, image_token=image_token,
                 image_grid_pinpoints=config.image_grid_pinpoints,
                 anyres_max_crops=config.anyres_max_crops)
