"""projection_impl='pallas' (fused LoRA kernel, interpret mode on CPU) against 'xla'."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import sft
from openvlm_jax import config_lib, parallel
from openvlm_jax.models import lora
from openvlm_jax.models.config import LoraConfig, VLMConfig
from openvlm_jax.models.vlm import VLM
from openvlm_jax.objectives import sft as sft_objective

VOCAB, SEQ, IMAGE_TOKEN = 40, 16, 3
TOLERANCE = 1e-5


def _vlm_config(base_dtype: str, projection_impl: str, attention_impl: str = 'xla') -> VLMConfig:
  """The tiny model with rank-4 adapters on every LLM Dense."""
  config = sft.get_config('model=tiny')
  config.model.attention_impl = attention_impl
  config.model.projection_impl = projection_impl
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.lora.targets = (r'llm/.*',)
  config.lora.base_dtype = base_dtype
  return config_lib.build_vlm_config(config.model, vocab_size=VOCAB, image_token_id=IMAGE_TOKEN,
                                     lora=config.lora)


def _batch(config: VLMConfig) -> dict:
  """Two examples, one left-padded, with one image each."""
  rng = np.random.default_rng(0)
  num_image_tokens, size = config.vision.num_image_tokens, config.vision.image_size
  input_ids = rng.integers(4, VOCAB, size=(2, SEQ)).astype(np.int32)
  input_ids[:, 3:3 + num_image_tokens] = IMAGE_TOKEN
  attention_mask = np.ones((2, SEQ), np.int32)
  attention_mask[1, :2] = 0
  loss_mask = np.zeros((2, SEQ), np.float32)
  loss_mask[:, 3 + num_image_tokens:-1] = 1.0
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
  return {'input_ids': input_ids, 'targets': np.roll(input_ids, -1, axis=1),
          'loss_mask': loss_mask, 'attention_mask': attention_mask, 'positions': positions,
          'images': rng.normal(size=(2, 1, size, size, 3)).astype(np.float32)}


def _init(config: VLMConfig, batch: dict):
  """Params with nonzero B, so the low-rank term (and its gradient w.r.t. A) is exercised."""
  params = jax.jit(VLM(config).init)(
      jax.random.key(0), batch['input_ids'], batch['images'], positions=batch['positions'],
      attention_mask=batch['attention_mask'])
  def perturb(path, leaf):
    if jax.tree_util.keystr(path).endswith("'lora_b']"):
      seed = abs(hash(jax.tree_util.keystr(path))) % (1 << 31)
      return 0.05 * jax.random.normal(jax.random.key(seed), leaf.shape, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(perturb, params)


def _loss_logits_grads(config: VLMConfig, params, batch: dict):
  """(loss, logits, grads w.r.t. every float param but quantized-base scales), one compile."""
  model, loss_fn = VLM(config), sft_objective.loss_terms

  def trainable(path, leaf):
    frozen = any(f"'{name}'" in jax.tree_util.keystr(path) for name in lora.QUANTIZED_PARAMS)
    return None if frozen or not jnp.issubdtype(leaf.dtype, jnp.floating) else leaf

  floats = jax.tree_util.tree_map_with_path(trainable, params)

  def loss(float_params):
    merged = jax.tree.map(lambda f, p: p if f is None else f, float_params, params,
                          is_leaf=lambda x: x is None)
    logits = model.apply(merged, batch['input_ids'], batch['images'],
                         positions=batch['positions'], attention_mask=batch['attention_mask'])
    terms = loss_fn(logits, batch)
    return terms['nll_sum'] / terms['num_tokens'], logits

  (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(floats)
  return value, logits, grads


def _relative_error(ours, expected) -> float:
  ours, expected = np.asarray(ours), np.asarray(expected)
  return float(np.max(np.abs(ours - expected)) / max(np.max(np.abs(expected)), 1e-6))


def _assert_same(reference, candidate, real: np.ndarray):
  """Loss, logits at real tokens and every gradient leaf (adapters, float bases...) agree.

  Padding positions are left out of the logits: queries that see no key differ by kernel.
  """
  (ref_loss, ref_logits, ref_grads), (loss, logits, grads) = reference, candidate
  assert abs(float(loss) - float(ref_loss)) <= TOLERANCE * abs(float(ref_loss))
  assert _relative_error(np.asarray(logits)[real], np.asarray(ref_logits)[real]) <= TOLERANCE
  flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads)
  flat = jax.tree.leaves(grads)
  assert len(flat) == len(flat_ref)
  names = [jax.tree_util.keystr(path) for path, _ in flat_ref]
  assert sum("'lora_a'" in name for name in names) > 0
  for name, (_, want), got in zip(names, flat_ref, flat):
    assert _relative_error(got, want) <= TOLERANCE, name


@pytest.mark.parametrize('base_dtype', ['float32', 'nf4'])
def test_pallas_projection_matches_xla(base_dtype):
  """Float32 base: the base kernels' gradients agree too (a trained W gets x^T dy). NF4 base
  (QLoRA): the kernel dequantizes the 4-bit codes tile by tile."""
  xla_config = _vlm_config(base_dtype, 'xla')
  batch = _batch(xla_config)
  params = _init(xla_config, batch)
  _assert_same(_loss_logits_grads(xla_config, params, batch),
               _loss_logits_grads(_vlm_config(base_dtype, 'pallas'), params, batch),
               batch['attention_mask'].astype(bool))


def test_pallas_projection_matches_xla_int8_base_with_pallas_attention():
  """Int8 base, projection alone and together with attention_impl='pallas'."""
  xla_config = _vlm_config('int8', 'xla')
  batch = _batch(xla_config)
  params = _init(xla_config, batch)
  reference = _loss_logits_grads(xla_config, params, batch)
  real = batch['attention_mask'].astype(bool)
  _assert_same(reference, _loss_logits_grads(_vlm_config('int8', 'pallas'), params, batch), real)
  both = _vlm_config('int8', 'pallas', attention_impl='pallas')
  _assert_same(reference, _loss_logits_grads(both, params, batch), real)


def test_projection_impl_reaches_lora_config():
  """VLMConfig.projection_impl is what the LoRA Dense layers read, also after a replace."""
  config = _vlm_config('float32', 'pallas')
  assert config.layer_lora.projection_impl == 'pallas'
  swapped = dataclasses.replace(config, projection_impl='xla')
  assert swapped.layer_lora.projection_impl == 'xla'
  relora = dataclasses.replace(config, lora=LoraConfig(rank=2, targets=('llm/.*',)))
  assert relora.layer_lora.projection_impl == 'pallas'
  assert lora.is_target(relora.layer_lora, 'llm/layers/mlp/up_proj')
  assert dataclasses.replace(config, lora=None).layer_lora is None


def _traced_kernel_calls(config: VLMConfig, rngs: dict | None = None) -> int:
  """How many fused-projection kernels the model's forward pass holds (traced, not compiled)."""
  batch = _batch(config)
  model = VLM(config)
  args = (batch['input_ids'], batch['images'])
  kwargs = {'positions': batch['positions'], 'attention_mask': batch['attention_mask']}
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  jaxpr = jax.make_jaxpr(lambda p: model.apply(p, *args, rngs=rngs, **kwargs))(params)
  return str(jaxpr).count('name=lora_projection')


def test_routing_rule():
  """Pallas for float, int8 and NF4 targets; XLA for 'xla' and while dropout is active."""
  # 7 projections traced once inside the scanned layer, plus the LM head.
  assert _traced_kernel_calls(_vlm_config('float32', 'pallas')) == 8
  assert _traced_kernel_calls(_vlm_config('int8', 'pallas')) == 8
  assert _traced_kernel_calls(_vlm_config('float32', 'xla')) == 0
  assert _traced_kernel_calls(_vlm_config('nf4', 'pallas')) == 8
  with_dropout = _vlm_config('float32', 'pallas')
  with_dropout = dataclasses.replace(
      with_dropout, lora=dataclasses.replace(with_dropout.lora, dropout=0.1))
  assert _traced_kernel_calls(with_dropout, rngs={'dropout': jax.random.key(1)}) == 0
  assert _traced_kernel_calls(with_dropout) == 8  # deterministic: dropout is the identity


def _kernel_calls(jaxpr, inside_shard_map=False, counts=None) -> collections.Counter:
  """(Pallas kernel name, whether inside a shard_map) -> count, over every nested jaxpr."""
  counts = collections.Counter() if counts is None else counts
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'pallas_call':
      counts[(str(eqn.params['name']), inside_shard_map)] += 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, 'jaxpr', sub)  # a ClosedJaxpr's Jaxpr
        if hasattr(sub, 'eqns'):
          _kernel_calls(sub, inside_shard_map or eqn.primitive.name == 'shard_map', counts)
  return counts


def test_pallas_kernels_under_a_mesh_match_one_device():
  """On 4 devices (fsdp=2, tensor=2) both kernels run per device under shard_map: examples,
  tokens and heads split, output columns where the rules allow. Loss, logits and gradients
  equal the one-device XLA model's."""
  xla_config = _vlm_config('nf4', 'xla')
  batch = _batch(xla_config)
  params = _init(xla_config, batch)
  reference = _loss_logits_grads(xla_config, params, batch)
  both = _vlm_config('nf4', 'pallas', attention_impl='pallas')
  mesh = parallel.make_mesh(dict(data=1, fsdp=2, tensor=2), jax.devices()[:4])
  rules = sft.get_config('model=tiny').logical_axis_rules
  with parallel.mesh_rules(mesh, rules):
    on_mesh = jax.device_put((params, batch), NamedSharding(mesh, P()))
    candidate = _loss_logits_grads(both, *on_mesh)
    model = VLM(both)
    forward = jax.make_jaxpr(lambda p: model.apply(
        p, batch['input_ids'], batch['images'], positions=batch['positions'],
        attention_mask=batch['attention_mask']))(on_mesh[0])
  _assert_same(reference, candidate, batch['attention_mask'].astype(bool))
  calls = _kernel_calls(forward.jaxpr)
  assert calls[('lora_projection', True)] >= 8  # 7 per (scanned) layer and the LM head
  assert calls[('flash_attention_forward', True)] >= 2  # the decoder and the vision tower
  assert not any(count for (_, inside), count in calls.items() if not inside), calls
