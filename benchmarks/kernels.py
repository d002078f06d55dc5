r"""Kernel speed: our Pallas flash attention and fused (Q)LoRA projection against the others.

Attention (causal, GQA 32 query / 8 kv heads, head_dim 128, bfloat16) at sequence 1k, 4k and
8k against XLA's unfused attention, `jax.nn.dot_product_attention` (cuDNN where present) and
the Pallas attention that ships inside jax (`ops.gpu.attention.mha` on GPU,
`ops.tpu.flash_attention` on TPU). Projection: the 7B (Llama-2) shapes, 4096 tokens, rank 16,
fused against `x W + s (x A) B` in XLA, with a bfloat16, an int8 and an NF4 weight (XLA:
dequantize the whole weight, then matmul, then the low-rank term). Forward and
forward+backward, median time and TFLOP/s (causal attention counts half the square). Prints a
table and writes JSON; runs in under 5 minutes on a GPU or TPU.

On CPU the Pallas kernels only run in the interpreter, so shapes shrink (sequence 256 and 512,
256 tokens of a 1024-wide projection) and interpret-mode kernels are left out unless
`--cpu_interpret` is given; the output says so.

  python benchmarks/kernels.py --out=benchmarks/results/kernels.json
"""

import argparse
import functools
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax.models import attention as model_attention
from openvlm_jax.models import quant
from pallas_kernels import flash_attention, lora_projection

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
PROJECTIONS_7B = {'q_proj': (4096, 4096), 'gate_proj': (4096, 11008), 'down_proj': (11008, 4096)}
RANK, TOKENS = 16, 4096


def _median_seconds(fn, args, repeats):
  """Compiles, warms up, then returns the median wall time of `repeats` calls."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _fwd_and_grad(fn, num_diff):
  """(jitted forward, jitted forward+backward w.r.t. the first `num_diff` args).

  value_and_grad, not grad: a backward that needs no forward output (the fused projection's)
  would otherwise let XLA drop the forward kernel from the timing.
  """
  def loss(*args):
    return jnp.sum(fn(*args).astype(jnp.float32))
  return jax.jit(fn), jax.jit(jax.value_and_grad(loss, argnums=tuple(range(num_diff))))


def _jax_pallas_attention(backend):
  """Pallas attention shipped inside jax for `backend`, in our layout, or None."""
  if backend == 'gpu':
    from jax.experimental.pallas.ops.gpu import attention as gpu_attention
    def run(q, k, v):
      group = q.shape[2] // k.shape[2]  # this op wants as many kv heads as query heads
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      return gpu_attention.mha(q, k, v, segment_ids=None, causal=True)
    return run
  if backend == 'tpu':
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_attention
    def run(q, k, v):
      group = q.shape[2] // k.shape[2]
      k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
      to_bhsd = lambda x: x.transpose(0, 2, 1, 3)
      out = tpu_attention.flash_attention(to_bhsd(q), to_bhsd(k), to_bhsd(v), causal=True,
                                          sm_scale=q.shape[-1] ** -0.5)
      return to_bhsd(out)
    return run
  return None


def attention_methods(backend, run_ours):
  """name -> fn(q, k, v) for every method the backend supports."""
  def xla(q, k, v):
    mask = model_attention.make_causal_mask(jnp.ones(q.shape[:2], jnp.int32))
    return model_attention.dot_product_attention(q, k, v, mask=mask, impl='xla')
  methods = {'xla_unfused': xla,
             'jax.nn.dpa': functools.partial(jax.nn.dot_product_attention, is_causal=True)}
  if backend == 'gpu':
    methods['jax.nn.dpa_cudnn'] = functools.partial(
        jax.nn.dot_product_attention, is_causal=True, implementation='cudnn')
  jax_pallas = _jax_pallas_attention(backend)
  if jax_pallas is not None:
    methods['jax_pallas'] = jax_pallas
  if run_ours:
    methods['ours_pallas'] = functools.partial(flash_attention.flash_attention, causal=True)
  return methods


def bench_attention(backend, seqs, heads, kv_heads, run_ours, repeats):
  """Rows of attention timings."""
  rows = []
  rng = np.random.default_rng(0)
  for seq in seqs:
    q = jnp.asarray(rng.normal(size=(1, seq, heads, HEAD_DIM)), jnp.bfloat16)
    k = jnp.asarray(rng.normal(size=(1, seq, kv_heads, HEAD_DIM)), jnp.bfloat16)
    v = jnp.asarray(rng.normal(size=(1, seq, kv_heads, HEAD_DIM)), jnp.bfloat16)
    fwd_flops = 4 * heads * seq * seq * HEAD_DIM / 2  # causal: half the square
    for name, fn in attention_methods(backend, run_ours).items():
      row = {'kernel': 'attention', 'shape': f'seq={seq} h={heads}/{kv_heads} d={HEAD_DIM}',
                 'method': name}
      try:
        forward, backward = _fwd_and_grad(fn, 3)
        row['fwd_ms'] = 1e3 * _median_seconds(forward, (q, k, v), repeats)
        row['fwd_bwd_ms'] = 1e3 * _median_seconds(backward, (q, k, v), repeats)
        row['fwd_tflops'] = fwd_flops / row['fwd_ms'] / 1e9
        row['fwd_bwd_tflops'] = 3.5 * fwd_flops / row['fwd_bwd_ms'] / 1e9
      except Exception as error:  # noqa: BLE001  (a method the backend cannot lower: reported)
        row['error'] = f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'
      rows.append(row)
  return rows


def _xla_lora(weight_kind):
  """x dequant(W) + 2 (x A) B in XLA: fn(x, lora_a, lora_b, weight, weight_aux)."""
  def run(x, lora_a, lora_b, weight, weight_aux):
    if weight_kind == 'nf4':  # the whole [in, out] weight, dequantized in the compute dtype
      shape = (x.shape[-1], weight.shape[1])
      dense = quant.dequantize_nf4(weight, weight_aux, shape, x.dtype)
    else:
      dense = weight.astype(x.dtype)
    base = jnp.dot(x, dense, preferred_element_type=jnp.float32)
    if weight_kind == 'int8':
      base = base * weight_aux
    low = jnp.dot(jnp.dot(x, lora_a), lora_b, preferred_element_type=jnp.float32)
    return (base + 2.0 * low).astype(x.dtype)
  return run


def _ours(weight_kind):
  """Our fused kernel: fn(x, lora_a, lora_b, weight, weight_aux)."""
  aux_name = {'int8': 'weight_scale', 'nf4': 'weight_absmax'}.get(weight_kind)
  def run(x, lora_a, lora_b, weight, weight_aux):
    kwargs = {aux_name: weight_aux} if aux_name else {}
    return lora_projection.lora_projection(x, weight, lora_a, lora_b, scale=2.0, **kwargs)
  return run


def bench_projection(projections, tokens, run_ours, repeats):
  """Rows of projection timings, bfloat16, int8 and NF4 weights."""
  rows = []
  rng = np.random.default_rng(0)
  for proj_name, (in_features, out_features) in projections.items():
    x = jnp.asarray(rng.normal(size=(tokens, in_features)), jnp.bfloat16)
    lora_a = jnp.asarray(rng.normal(size=(in_features, RANK)) * 0.01, jnp.bfloat16)
    lora_b = jnp.asarray(rng.normal(size=(RANK, out_features)) * 0.01, jnp.bfloat16)
    fwd_flops = 2 * tokens * out_features * in_features + 2 * tokens * RANK * (
        in_features + out_features)
    bwd_flops = 2 * tokens * out_features * in_features + 5 * tokens * RANK * (
        in_features + out_features)  # dx only for W; dA, dB and the x A recompute
    for weight_kind in ('bf16', 'int8', 'nf4'):
      if weight_kind == 'bf16':
        weight = jnp.asarray(rng.normal(size=(in_features, out_features)) * 0.02, jnp.bfloat16)
        weight_aux = None
      elif weight_kind == 'int8':
        weight = jnp.asarray(rng.integers(-127, 128, size=(in_features, out_features)), jnp.int8)
        weight_aux = jnp.full((out_features,), 1e-3, jnp.float32)
      else:  # packed [in_pad / 2, out] uint8, absmax [in_pad / 64, out]
        weight, weight_aux = jax.jit(quant.quantize_nf4)(
            jnp.asarray(rng.normal(size=(in_features, out_features)) * 0.02, jnp.float32))
      methods = {'xla_unfused': _xla_lora(weight_kind)}
      if run_ours:
        methods['ours_pallas'] = _ours(weight_kind)
      for name, fn in methods.items():
        row = {'kernel': f'lora_{weight_kind}',
                   'shape': f'{proj_name} {tokens}x{in_features}x{out_features} r={RANK}',
                   'method': name}
        try:
          forward, backward = _fwd_and_grad(fn, 3)
          operands = (x, lora_a, lora_b, weight, weight_aux)  # arguments, not constants
          row['fwd_ms'] = 1e3 * _median_seconds(forward, operands, repeats)
          row['fwd_bwd_ms'] = 1e3 * _median_seconds(backward, operands, repeats)
          row['fwd_tflops'] = fwd_flops / row['fwd_ms'] / 1e9
          row['fwd_bwd_tflops'] = (fwd_flops + bwd_flops) / row['fwd_bwd_ms'] / 1e9
        except Exception as error:  # noqa: BLE001
          row['error'] = f'{type(error).__name__}: {str(error).splitlines()[0][:120]}'
        rows.append(row)
  return rows


def print_table(rows):
  """One line per (kernel, shape, method)."""
  print(f"{'kernel':<10} {'shape':<34} {'method':<17} {'fwd ms':>9} {'TF/s':>7} "
        f"{'fwd+bwd ms':>11} {'TF/s':>7}")
  for row in rows:
    if 'error' in row:
      print(f"{row['kernel']:<10} {row['shape']:<34} {row['method']:<17} {row['error']}")
      continue
    print(f"{row['kernel']:<10} {row['shape']:<34} {row['method']:<17} {row['fwd_ms']:>9.3f} "
          f"{row['fwd_tflops']:>7.2f} {row['fwd_bwd_ms']:>11.3f} {row['fwd_bwd_tflops']:>7.2f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', default='benchmarks/results/kernels.json')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--cpu_interpret', action='store_true',
                      help='on CPU, also time our kernels in the Pallas interpreter (slow)')
  args = parser.parse_args()
  backend = jax.default_backend()
  notes = []
  if backend == 'cpu':
    seqs, heads, kv_heads = (256, 512), 8, 2
    projections, tokens = {'small': (1024, 1024)}, 256
    run_ours = args.cpu_interpret
    notes.append('cpu: shapes shrunk (seq 256/512, 8/2 heads; 256x1024x1024 projection)')
    if not run_ours:
      notes.append('cpu: Pallas kernels only run in the interpreter here; their timings are '
                   'skipped (pass --cpu_interpret to include them)')
    repeats = min(args.repeats, 3)
  else:
    seqs, heads, kv_heads = (1024, 4096, 8192), HEADS, KV_HEADS
    projections, tokens, run_ours, repeats = PROJECTIONS_7B, TOKENS, True, args.repeats
  for note in notes:
    print(note)
  print(f'device: {jax.devices()[0].device_kind} ({backend})')
  start = time.perf_counter()
  rows = bench_attention(backend, seqs, heads, kv_heads, run_ours, repeats)
  rows += bench_projection(projections, tokens, run_ours, repeats)
  print_table(rows)
  print(f'total {time.perf_counter() - start:.0f} s')
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, 'w') as f:
    json.dump({'device': jax.devices()[0].device_kind, 'backend': backend, 'notes': notes,
               'rows': rows}, f, indent=2)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
