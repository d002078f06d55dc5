"""Export LoRA adapters as a PEFT adapter folder that `peft.PeftModel.from_pretrained` loads.

The folder holds `adapter_config.json` and `adapter_model.safetensors` with PEFT's key names
for `LlavaForConditionalGeneration` in transformers 5 (module names under `model.`), e.g.
  base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight  [rank, in]
  base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_B.weight  [out, rank]
Components trained in full (e.g. the projector of the LoRA + projector recipe) are saved
whole, as PEFT's `modules_to_save`, with any adapters on them merged in.
"""

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors.numpy import save_file

from openvlm_jax.console import UserError
from openvlm_jax.hf import convert
from openvlm_jax.hf import io as hf_io
from openvlm_jax.models import lora as lora_lib
from openvlm_jax.models.config import VLMConfig

# Our component -> the module-name prefix inside LlavaForConditionalGeneration (transformers 5).
MODULE_PREFIXES = {
    'llm': 'model.language_model.',
    'lm_head': '',
    'vision': 'model.vision_tower.',
    'projector': 'model.multi_modal_projector.',
}
PEFT_PREFIX = 'base_model.model.'
COMPONENT_ROOTS = {'llm': 'llm', 'lm_head': 'llm', 'vision': 'vision', 'projector': 'projector'}


def _rules(config: VLMConfig) -> list[convert.Rule]:
  return (convert.vision_rules(config.vision)
          + convert.projector_rules(config.projector, config.projector_bias)
          + convert.llm_rules(config.llm))


def _dense_modules(params: Mapping, config: VLMConfig) -> Iterator[tuple[str, str, dict]]:
  """Yields (our component, HF module name, that Dense's params) for every Dense kernel."""
  for rule in _rules(config):
    if rule.path[-1] != 'kernel' or rule.layout.kind != 'kernel':
      continue
    root = COMPONENT_ROOTS[rule.component]
    module_name = MODULE_PREFIXES[rule.component] + rule.hf_name.removesuffix('.weight')
    tree = params[root]
    if not rule.per_layer:
      yield rule.component, module_name, convert._get(tree, rule.path[:-1])
      continue
    scanned, num_layers = convert._layer_roots(tree, ())
    for i in range(num_layers):
      if scanned:
        stacked = convert._get(tree['layers'], rule.path[:-1])
        layer = {name: np.asarray(value)[i] for name, value in stacked.items()}
      else:
        layer = convert._get(tree[f'layers_{i}'], rule.path[:-1])
      yield rule.component, module_name.format(i=i), layer


def adapter_tensors(params: Mapping, config: VLMConfig,
                    full_components: Sequence[str] = ()) -> tuple[dict, list[str], list[str]]:
  """PEFT tensors of our LoRA params.

  Returns (name -> numpy float32 tensor, LoRA target module names, modules_to_save).
  """
  params = jax.device_get(params)
  tensors, targets = {}, []
  for component, module_name, layer in _dense_modules(params, config):
    if 'lora_a' not in layer or COMPONENT_ROOTS[component] in full_components:
      continue
    lora_a = np.asarray(layer['lora_a'], np.float32)  # [in..., rank]
    lora_b = np.asarray(layer['lora_b'], np.float32)  # [rank, out...]
    rank = lora_a.shape[-1]
    tensors[f'{PEFT_PREFIX}{module_name}.lora_A.weight'] = lora_a.reshape(-1, rank).T
    tensors[f'{PEFT_PREFIX}{module_name}.lora_B.weight'] = lora_b.reshape(rank, -1).T
    targets.append(module_name)
  modules_to_save = []
  if full_components:
    merged = lora_lib.merge_params(params, config.lora) if config.lora else params
    plain = dataclasses.replace(config, lora=None)
    for name, tensor in convert.iter_hf_tensors(merged, plain):
      for component in full_components:
        classic = convert.PREFIXES['llava'][component][0]
        if name.startswith(classic):
          module = MODULE_PREFIXES[component] + name[len(classic):]
          tensors[PEFT_PREFIX + module] = np.asarray(tensor, np.float32)
    modules_to_save = [MODULE_PREFIXES[c].rstrip('.') for c in full_components]
  return tensors, targets, modules_to_save


def save_adapter(folder: str | os.PathLike, config: VLMConfig, params: Mapping, *,
                 base_model_name_or_path: str, full_components: Sequence[str] = (),
                 dtype: str = 'float32') -> dict:
  """Writes `adapter_config.json` + `adapter_model.safetensors` into `folder`.

  Args:
    folder: created if needed.
    config: the VLMConfig with its `lora` section (rank, alpha, dropout).
    params: our unboxed params with 'lora_a'/'lora_b' (scanned or unrolled layers).
    base_model_name_or_path: the Hugging Face base model (hub id or folder) the adapter
      applies to; `PeftModel` users load that model first.
    full_components: our components trained in full and saved whole ('projector',
      'vision', 'llm').
    dtype: 'float32' | 'bfloat16' of the stored tensors.

  Returns:
    The adapter config written.
  """
  if config.lora is None:
    raise UserError('the model has no LoRA config; export merged weights instead')
  tensors, targets, modules_to_save = adapter_tensors(params, config, full_components)
  if not targets and not modules_to_save:
    raise UserError('no LoRA adapters found in params')
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  if dtype not in hf_io.SAVE_DTYPES:
    raise UserError(f'dtype {dtype!r} not one of {sorted(hf_io.SAVE_DTYPES)}')
  save_dtype = hf_io.SAVE_DTYPES[dtype]
  save_file({name: np.ascontiguousarray(t.astype(save_dtype)) for name, t in tensors.items()},
            folder / 'adapter_model.safetensors', metadata={'format': 'pt'})
  adapter_config: dict[str, Any] = {
      'peft_type': 'LORA',
      'task_type': None,
      'base_model_name_or_path': str(base_model_name_or_path),
      'auto_mapping': {'base_model_class': 'LlavaForConditionalGeneration',
                       'parent_library': 'transformers.models.llava.modeling_llava'},
      'r': config.lora.rank,
      'lora_alpha': config.lora.alpha,
      'lora_dropout': config.lora.dropout,
      'target_modules': sorted(targets),
      'modules_to_save': modules_to_save or None,
      'bias': 'none',
      'fan_in_fan_out': False,
      'use_rslora': False,
      'use_dora': False,
      'init_lora_weights': True,
      'inference_mode': True,
  }
  (folder / 'adapter_config.json').write_text(json.dumps(adapter_config, indent=2))
  return adapter_config
