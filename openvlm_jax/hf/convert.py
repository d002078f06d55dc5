"""Hugging Face tensor names <-> our parameter trees, in both directions, as pure functions.

A table of rules maps each of our parameters to one Hugging Face tensor (per layer for
layer parameters) and a layout that says how the arrays differ:
  Linear [out, in]            <-> kernel [in, ...] (split into heads where ours has them)
  Linear o_proj [out, h * d]  <-> kernel [h, d, out]
  Conv [out, in, kh, kw]      <-> kernel [kh, kw, in, out]
  bias [h * d]                <-> bias [h, d]
Per-layer tensors are stacked into the scanned 'layers' axis (or kept as 'layers_<i>').

Checkpoint name prefixes differ between transformers versions; reading accepts all known
spellings, writing uses the classic llava-hf one (loads in transformers 4.x and 5.x and vLLM).
"""

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from openvlm_jax.console import UserError
from openvlm_jax.models import layers as model_layers
from openvlm_jax.models.config import LLMConfig, VisionConfig, VLMConfig
from openvlm_jax.models.llm import LLM
from openvlm_jax.models.vision import VisionTower
from openvlm_jax.models.vlm import init_params

Config = VLMConfig | LLMConfig | VisionConfig
Path = tuple[str, ...]
PlaceFn = Callable[[Path, np.ndarray], Any]

# Component -> name prefixes, first match wins on reading; the first one is written.
PREFIXES = {
    'llava': {
        'llm': ('language_model.model.', 'model.language_model.'),
        'lm_head': ('language_model.', ''),
        'vision': ('vision_tower.vision_model.', 'vision_tower.', 'model.vision_tower.',
                   'model.vision_tower.vision_model.'),
        'projector': ('multi_modal_projector.', 'model.multi_modal_projector.'),
        'newline': ('image_newline', 'model.image_newline'),
    },
    'llm': {'llm': ('model.',), 'lm_head': ('',)},
    'vision': {'vision': ('vision_model.', '')},
}
# Checkpoint tensors that we do not model and may drop silently.
IGNORED = re.compile(
    r'(^|\.)(head\.|position_ids$|rotary_emb\.inv_freq$|text_model\.|logit_scale$|logit_bias$|'
    r'text_projection\.|visual_projection\.|embeddings\.mask_token$)'
)


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a Hugging Face tensor is laid out relative to our parameter."""

  kind: str  # 'same' | 'flat' | 'kernel' | 'conv' | 'batched'
  # 'kernel': leading axes of ours that HF flattens into `in`; 'batched': the size-1 axes HF
  # puts in front of ours (DINOv2's [1, 1, embed] class token).
  num_in_axes: int = 1

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor shape for our parameter shape."""
    if self.kind == 'same':
      return tuple(shape)
    if self.kind == 'batched':
      return (1,) * self.num_in_axes + tuple(shape)
    if self.kind == 'flat':
      return (math.prod(shape),)
    if self.kind == 'kernel':
      split = self.num_in_axes
      return (math.prod(shape[split:]), math.prod(shape[:split]))
    return (shape[3], shape[2], shape[0], shape[1])  # conv

  def to_param(self, tensor: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """HF tensor -> our parameter of `shape`."""
    if self.kind == 'kernel':
      return tensor.T.reshape(shape)
    if self.kind == 'conv':
      return tensor.transpose(2, 3, 1, 0)
    return tensor.reshape(shape)

  def to_hf(self, param: np.ndarray) -> np.ndarray:
    """Our parameter -> HF tensor."""
    if self.kind == 'kernel':
      return param.reshape(self.hf_shape(param.shape)[::-1]).T
    if self.kind == 'conv':
      return param.transpose(3, 2, 0, 1)
    return param.reshape(self.hf_shape(param.shape))


SAME, FLAT, KERNEL = Layout('same'), Layout('flat'), Layout('kernel')
OUT_KERNEL, CONV = Layout('kernel', num_in_axes=2), Layout('conv')


@dataclasses.dataclass(frozen=True)
class Rule:
  """One parameter <-> one HF tensor (one per layer when `per_layer`)."""

  component: str  # key into PREFIXES[...]: 'llm' | 'lm_head' | 'vision' | 'projector'
  path: Path  # ours, below the component root (below the layer for per-layer rules)
  hf_name: str  # theirs, below the prefix ('{i}' is the layer index)
  layout: Layout
  per_layer: bool = False


def llm_rules(config: LLMConfig) -> list[Rule]:
  """Rules of the decoder (paths below the LLM's params)."""
  rules = [
      Rule('llm', ('embed_tokens', 'embedding'), 'embed_tokens.weight', SAME),
      Rule('llm', ('final_norm', 'scale'), 'norm.weight', SAME),
  ]
  if not config.tie_embeddings:
    rules.append(Rule('lm_head', ('lm_head', 'kernel'), 'lm_head.weight', KERNEL))
  layer = [
      (('input_norm', 'scale'), 'input_layernorm.weight', SAME),
      (('post_attention_norm', 'scale'), 'post_attention_layernorm.weight', SAME),
      (('attention', 'o_proj', 'kernel'), 'self_attn.o_proj.weight', OUT_KERNEL),
      (('mlp', 'gate_proj', 'kernel'), 'mlp.gate_proj.weight', KERNEL),
      (('mlp', 'up_proj', 'kernel'), 'mlp.up_proj.weight', KERNEL),
      (('mlp', 'down_proj', 'kernel'), 'mlp.down_proj.weight', KERNEL),
  ]
  for proj in ('q_proj', 'k_proj', 'v_proj'):
    layer.append((('attention', proj, 'kernel'), f'self_attn.{proj}.weight', KERNEL))
    if config.qkv_bias:
      layer.append((('attention', proj, 'bias'), f'self_attn.{proj}.bias', FLAT))
  rules += [Rule('llm', path, f'layers.{{i}}.{name}', lay, True) for path, name, lay in layer]
  return rules


def dinov2_rules() -> list[Rule]:
  """Rules of a DINOv2 tower (Dinov2Model's saved names)."""
  rules = [
      (('patch_embedding', 'kernel'), 'embeddings.patch_embeddings.projection.weight', CONV),
      (('patch_embedding', 'bias'), 'embeddings.patch_embeddings.projection.bias', SAME),
      (('class_embedding',), 'embeddings.cls_token', Layout('batched', 2)),
      (('position_embedding',), 'embeddings.position_embeddings', Layout('batched', 1)),
      (('post_norm', 'scale'), 'layernorm.weight', SAME),
      (('post_norm', 'bias'), 'layernorm.bias', SAME),
  ]
  layer = [
      (('norm1', 'scale'), 'norm1.weight', SAME),
      (('norm1', 'bias'), 'norm1.bias', SAME),
      (('norm2', 'scale'), 'norm2.weight', SAME),
      (('norm2', 'bias'), 'norm2.bias', SAME),
      (('layer_scale1',), 'layer_scale1.lambda1', SAME),
      (('layer_scale2',), 'layer_scale2.lambda1', SAME),
      (('attention', 'o_proj', 'kernel'), 'attention.output.dense.weight', OUT_KERNEL),
      (('attention', 'o_proj', 'bias'), 'attention.output.dense.bias', SAME),
      (('fc1', 'kernel'), 'mlp.fc1.weight', KERNEL),
      (('fc1', 'bias'), 'mlp.fc1.bias', SAME),
      (('fc2', 'kernel'), 'mlp.fc2.weight', KERNEL),
      (('fc2', 'bias'), 'mlp.fc2.bias', SAME),
  ]
  for ours, theirs in (('q_proj', 'query'), ('k_proj', 'key'), ('v_proj', 'value')):
    layer.append((('attention', ours, 'kernel'), f'attention.attention.{theirs}.weight', KERNEL))
    layer.append((('attention', ours, 'bias'), f'attention.attention.{theirs}.bias', FLAT))
  return [Rule('vision', path, name, lay) for path, name, lay in rules] + [
      Rule('vision', path, f'encoder.layer.{{i}}.{name}', lay, True) for path, name, lay in layer
  ]


def vision_rules(config: VisionConfig) -> list[Rule]:
  """Rules of the vision tower (paths below the tower's params)."""
  if config.kind == 'dinov2':
    return dinov2_rules()
  is_clip = config.kind == 'clip'
  rules = [
      (('patch_embedding', 'kernel'), 'embeddings.patch_embedding.weight', CONV),
      (('position_embedding',), 'embeddings.position_embedding.weight', SAME),
      (('post_norm', 'scale'), 'post_layernorm.weight', SAME),
      (('post_norm', 'bias'), 'post_layernorm.bias', SAME),
  ]
  if is_clip:
    rules += [
        (('class_embedding',), 'embeddings.class_embedding', SAME),
        (('pre_norm', 'scale'), 'pre_layrnorm.weight', SAME),
        (('pre_norm', 'bias'), 'pre_layrnorm.bias', SAME),
    ]
  else:
    rules.append((('patch_embedding', 'bias'), 'embeddings.patch_embedding.bias', SAME))
  layer = [
      (('norm1', 'scale'), 'layer_norm1.weight', SAME),
      (('norm1', 'bias'), 'layer_norm1.bias', SAME),
      (('norm2', 'scale'), 'layer_norm2.weight', SAME),
      (('norm2', 'bias'), 'layer_norm2.bias', SAME),
      (('attention', 'o_proj', 'kernel'), 'self_attn.out_proj.weight', OUT_KERNEL),
      (('attention', 'o_proj', 'bias'), 'self_attn.out_proj.bias', SAME),
      (('fc1', 'kernel'), 'mlp.fc1.weight', KERNEL),
      (('fc1', 'bias'), 'mlp.fc1.bias', SAME),
      (('fc2', 'kernel'), 'mlp.fc2.weight', KERNEL),
      (('fc2', 'bias'), 'mlp.fc2.bias', SAME),
  ]
  for proj in ('q_proj', 'k_proj', 'v_proj'):
    layer.append((('attention', proj, 'kernel'), f'self_attn.{proj}.weight', KERNEL))
    layer.append((('attention', proj, 'bias'), f'self_attn.{proj}.bias', FLAT))
  return [Rule('vision', path, name, lay) for path, name, lay in rules] + [
      Rule('vision', path, f'encoder.layers.{{i}}.{name}', lay, True) for path, name, lay in layer
  ]


def projector_rules(kind: str, use_bias: bool) -> list[Rule]:
  """Rules of the projector: 'linear_1' (and 'linear_2' for mlp2x_gelu)."""
  names = ('linear_1',) if kind == 'linear' else ('linear_1', 'linear_2')
  rules = []
  for name in names:
    rules.append(Rule('projector', (name, 'kernel'), f'{name}.weight', KERNEL))
    if use_bias:
      rules.append(Rule('projector', (name, 'bias'), f'{name}.bias', SAME))
  return rules


def _model_parts(config: Config) -> tuple[str, dict[str, list[Rule]]]:
  """(checkpoint kind, {our top-level params key, or '' for a bare model: its rules})."""
  if isinstance(config, VLMConfig):
    parts = {
        'vision': vision_rules(config.vision),
        'projector': projector_rules(config.projector, config.projector_bias),
        'llm': llm_rules(config.llm),
    }
    if config.image_grid_pinpoints:  # LLaVA-NeXT's row-end embedding [embed]
      parts['image_newline'] = [Rule('newline', (), '', SAME)]
    return 'llava', parts
  if isinstance(config, LLMConfig):
    return 'llm', {'': llm_rules(config)}
  return 'vision', {'': vision_rules(config)}


def abstract_params(config: Config, scan_layers: bool = True) -> dict:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of our unboxed params for `config`."""
  if isinstance(config, VLMConfig):
    variables = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
    return nn.unbox(variables)['params']
  if isinstance(config, LLMConfig):
    model = LLM(config, scan_layers=scan_layers)
    args = (np.zeros((1, 2), np.int32),)
    kwargs = {'attention_mask': np.ones((1, 2), np.int32)}
  else:
    model = VisionTower(config, scan_layers=scan_layers)
    args = (np.zeros((1, config.image_size, config.image_size, 3), np.float32),)
    kwargs = {}
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  return nn.unbox(variables)['params']


def _get(tree: Mapping, path: Path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path: Path, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _layer_roots(tree: Mapping, root: Path) -> tuple[bool, int]:
  """(scanned, num_layers) of the layer stack below `root` in a params tree; (False, 0)
  where `root` is a single parameter (LLaVA-NeXT's image_newline)."""
  below = _get(tree, root) if root else tree
  if not isinstance(below, Mapping):
    return False, 0
  if 'layers' in below:
    leaf = jax.tree.leaves(below['layers'])[0]
    return True, leaf.shape[0]
  return False, sum(1 for key in below if re.fullmatch(r'layers_\d+', key))


def hf_to_params(
    tensors: Mapping[str, np.ndarray],
    config: Config,
    *,
    scan_layers: bool | None = None,
    param_dtype: str | None = None,
    place: PlaceFn | None = None,
) -> dict:
  """Our unboxed params from HF tensors (name -> array, read lazily if the Mapping is lazy).

  Args:
    tensors: HF tensor name -> array, for a LLaVA, a decoder or a vision checkpoint (matching
      the type of `config`); any prefix spelling of transformers 4.x/5.x.
    config: VLMConfig (LLaVA), LLMConfig (a *ForCausalLM) or VisionConfig (CLIP/SigLIP).
    scan_layers: layer layout of the result; default `config.scan_layers` for a VLMConfig,
      else True.
    param_dtype: 'float32' | 'bfloat16'; default the VLMConfig's param_dtype, else float32.
    place: called as place(param_path, array) for each finished parameter, e.g. to
      `jax.device_put` it with its sharding; default keeps numpy arrays.

  Returns:
    The params tree ({'vision', 'projector', 'llm'} for a VLM), in the config's param dtype.

  Raises:
    ValueError: a tensor is missing or has the wrong shape (the message names it).
  """
  if scan_layers is None:
    scan_layers = config.scan_layers if isinstance(config, VLMConfig) else True
  if param_dtype is None:
    param_dtype = getattr(config, 'param_dtype', 'float32')
  param_dtype = np.dtype(model_layers.to_dtype(param_dtype))
  expected = abstract_params(config, scan_layers)
  kind, parts = _model_parts(config)
  place = place or (lambda path, array: array)
  available = set(tensors.keys())
  consumed = set()

  def read(rule: Rule, layer_index: int | None, shape: tuple[int, ...]) -> np.ndarray:
    name = rule.hf_name.format(i=layer_index)
    candidates = [prefix + name for prefix in PREFIXES[kind][rule.component]]
    found = [full for full in candidates if full in available]
    if not found:
      raise UserError(f'tensor {candidates[0]} is missing from the checkpoint')
    tensor = tensors[found[0]]
    want = rule.layout.hf_shape(shape)
    if tuple(tensor.shape) != want:
      raise UserError(f'tensor {found[0]} has shape {tuple(tensor.shape)}, expected {want}')
    consumed.add(found[0])
    return rule.layout.to_param(np.asarray(tensor), shape).astype(param_dtype)

  params: dict = {}
  for root, rules in parts.items():
    root_path = (root,) if root else ()
    scanned, num_layers = _layer_roots(expected, root_path)
    for rule in rules:
      if not rule.per_layer:
        path = root_path + rule.path
        _set(params, path, place(path, read(rule, None, _get(expected, path).shape)))
      elif scanned:
        path = root_path + ('layers',) + rule.path
        shape = _get(expected, path).shape[1:]
        stacked = np.empty((num_layers, *shape), param_dtype)  # filled layer by layer
        for i in range(num_layers):
          stacked[i] = read(rule, i, shape)
        _set(params, path, place(path, stacked))
      else:
        for i in range(num_layers):
          path = root_path + (f'layers_{i}',) + rule.path
          _set(params, path, place(path, read(rule, i, _get(expected, path).shape)))
  unused = sorted(
      name for name in available - consumed
      if not IGNORED.search(name) and not name.endswith('lm_head.weight')
  )
  if unused:
    logging.warning('ignored %d checkpoint tensors: %s', len(unused), ', '.join(unused[:20]))
  return params


def _write_prefix(kind: str, component: str, config: Config) -> str:
  """The prefix written: the classic one, except for a DINOv2 tower, which (an AutoModel
  in LLaVA, not a *VisionModel) has no 'vision_model.' level."""
  vision = config.vision if isinstance(config, VLMConfig) else config
  if component == 'vision' and getattr(vision, 'kind', None) == 'dinov2':
    return {'llava': 'vision_tower.', 'vision': ''}[kind]
  return PREFIXES[kind][component][0]


def iter_hf_tensors(params: Mapping, config: Config) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF name, numpy array) for our params, one tensor at a time, classic layout.

  Layer stacks may be scanned ('layers') or unrolled ('layers_<i>'); arrays come back in
  their own dtype (cast them when writing).
  """
  kind, parts = _model_parts(config)
  for root, rules in parts.items():
    root_path = (root,) if root else ()
    scanned, num_layers = _layer_roots(params, root_path)
    for rule in rules:
      prefix = _write_prefix(kind, rule.component, config)
      if not rule.per_layer:
        param = np.asarray(_get(params, root_path + rule.path))
        yield prefix + rule.hf_name, rule.layout.to_hf(param)
        continue
      stacked = _get(params, root_path + ('layers',) + rule.path) if scanned else None
      for i in range(num_layers):
        if scanned:
          param = np.asarray(stacked[i])
        else:
          param = np.asarray(_get(params, root_path + (f'layers_{i}',) + rule.path))
        yield prefix + rule.hf_name.format(i=i), rule.layout.to_hf(param)


def params_to_hf(params: Mapping, config: Config) -> dict[str, np.ndarray]:
  """All HF tensors of our params as a dict (see `iter_hf_tensors`)."""
  return dict(iter_hf_tensors(params, config))
