"""Answer generation: prefill + KV-cache decoding, batched and jitted, with sampling.

The images of a batch go through the vision tower once; the prompt (left-padded, so every
row's last prompt token sits in the same cache slot) fills the KV cache in one pass; then one
token per step is decoded inside a `lax.while_loop` that stops when every row has produced a
stop token or `max_new_tokens` are out. Greedy, temperature, top-k and top-p sampling.
With `config.prefix_attention` (a prefix LM) the prompt is the prefix: the prefill attends
bidirectionally within it, and each generated token causally to everything before it.

  generate = make_generate_fn(model, SamplingConfig(max_new_tokens=8, stop_token_ids=(2,)))
  out = generate(params, input_ids, attention_mask, images)  # out['tokens'] [batch, 8]

`answer_prompts` turns encoded prompts (`data.examples.encode_prompt`) and their images into
answer strings, in batches of one compiled shape.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from openvlm_jax.models import layers
from openvlm_jax.models.llm import init_cache, positions_from_mask
from openvlm_jax.models.vlm import VLM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How tokens are chosen and when decoding stops."""

  max_new_tokens: int = 16
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0: all
  top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1: all
  stop_token_ids: tuple[int, ...] = ()
  pad_token_id: int = 0  # written after a row has stopped


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """Sets logits outside the top-k / top-p (nucleus) set to -inf. logits: [batch, vocab]."""
  logits = logits.astype(jnp.float32)
  if top_k > 0:
    kth_largest = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [batch, 1]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [batch, vocab], descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    # A token stays if the probability of the tokens ranked above it is still below top_p.
    mass_above = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    num_kept = jnp.maximum(jnp.sum(mass_above < top_p, axis=-1, keepdims=True), 1)  # [b, 1]
    threshold = jnp.take_along_axis(sorted_logits, num_kept - 1, axis=-1)  # [batch, 1]
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_tokens(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Picks one token per row from logits [batch, vocab]. Returns int32 [batch].

  `rng` is one key for the batch, or [batch] keys (row i samples with key i alone).
  """
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, top_k=sampling.top_k,
                         top_p=sampling.top_p)
  if rng.ndim:
    return jax.vmap(jax.random.categorical)(rng, logits).astype(jnp.int32)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def split_key(rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(next, now) from one key or from [batch] keys, each row's split on its own."""
  if rng.ndim:
    pairs = jax.vmap(jax.random.split)(rng)  # [batch, 2]
    return pairs[:, 0], pairs[:, 1]
  return tuple(jax.random.split(rng))


def make_generate_fn(model: VLM, sampling: SamplingConfig,
                     on_step: Callable[..., None] | None = None) -> Callable:
  """Returns jitted generate(params, input_ids, attention_mask, images=None, rng=None,
  image_feature_index=None, image_feature_weight=None).

  `on_step(step, tokens, live)`, when given, is called on the host at every decoding step, in
  order, with the step's tokens int32 [batch] and bool [batch] rows still generating (an
  `io_callback`, so a server can stream answers as they are decoded).

  Args of the returned function:
    params: the VLM's parameters ({'vision', 'projector', 'llm'}).
    input_ids: [batch, prompt_len] int32 prompts, LEFT-padded, image tokens expanded.
    attention_mask: [batch, prompt_len], 1 at real prompt tokens.
    images: [batch, max_images, H, W, 3] float32 or None.
    rng: a PRNG key for sampling (unused when greedy); or one per row, [batch] keys or their
      uint32 `jax.random.key_data` [batch, 2], so that a row's answer does not depend on
      the rows beside it (GRPO's rollouts, see `training.rollout`).
    image_feature_index, image_feature_weight: an anyres model's image layout (see
      `VLM.__call__`); `images` then holds each row's views.

  Returns of the returned function:
    `tokens` int32 [batch, max_new_tokens] (the stop token included, then `pad_token_id`)
    and `num_tokens` int32 [batch] (tokens up to and including the stop token).
  """
  max_new = sampling.max_new_tokens
  stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
  cache_dtype = layers.to_dtype(model.config.dtype)

  def generate(params, input_ids, attention_mask, images=None, rng=None,
               image_feature_index=None, image_feature_weight=None):
    variables = {'params': params}
    batch, prompt_len = input_ids.shape
    rng = jax.random.key(0) if rng is None else rng
    if not jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
      rng = jax.random.wrap_key_data(rng)  # raw [batch, 2] key data: one key per row
    image_features = None
    if images is not None:
      image_features = model.apply(variables, images, method=VLM.encode_images)
    cache = init_cache(model.config.llm, batch, prompt_len + max_new, cache_dtype)
    cache_mask = jnp.zeros((batch, prompt_len + max_new), jnp.int32)
    cache_mask = cache_mask.at[:, :prompt_len].set(attention_mask.astype(jnp.int32))
    positions = positions_from_mask(attention_mask)  # [batch, prompt_len]
    prefix_len = None
    if model.config.prefix_attention:
      # Prompts are left-padded, so every row's prompt ends at slot prompt_len; the padding
      # slots before a shorter prompt are masked out as keys by `cache_mask`.
      prefix_len = jnp.full((batch,), prompt_len, jnp.int32)
    logits, cache = model.apply(
        variables, input_ids, positions=positions, cache_mask=cache_mask, cache=cache,
        write_index=jnp.int32(0), image_features=image_features, prefix_len=prefix_len,
        image_feature_index=image_feature_index, image_feature_weight=image_feature_weight,
        method=VLM.decode)
    rng, step_rng = split_key(rng)
    first_token = sample_tokens(logits[:, -1], step_rng, sampling)

    def keep_going(carry):
      step, done = carry[0], carry[5]
      return (step < max_new) & ~jnp.all(done)

    def decode_one(carry):
      step, token, position, cache, cache_mask, done, tokens, num_tokens, rng = carry
      tokens = tokens.at[:, step].set(jnp.where(done, sampling.pad_token_id, token))
      if on_step is not None:
        io_callback(on_step, None, step, token, ~done, ordered=True)
      num_tokens = num_tokens + (~done).astype(jnp.int32)
      done = done | jnp.isin(token, stop_ids)
      slot = prompt_len + step
      cache_mask = jax.lax.dynamic_update_slice(
          cache_mask, jnp.ones((batch, 1), jnp.int32), (0, slot))
      logits, cache = model.apply(
          variables, token[:, None], positions=position[:, None], cache_mask=cache_mask,
          cache=cache, write_index=slot, prefix_len=prefix_len, method=VLM.decode)
      rng, step_rng = split_key(rng)
      next_token = sample_tokens(logits[:, 0], step_rng, sampling)
      return (step + 1, next_token, position + 1, cache, cache_mask, done, tokens, num_tokens,
              rng)

    carry = (jnp.int32(0), first_token, positions[:, -1] + 1, cache, cache_mask,
             jnp.zeros((batch,), jnp.bool_),
             jnp.full((batch, max_new), sampling.pad_token_id, jnp.int32),
             jnp.zeros((batch,), jnp.int32), rng)
    carry = jax.lax.while_loop(keep_going, decode_one, carry)
    return {'tokens': carry[6], 'num_tokens': carry[7]}

  return jax.jit(generate)


def sampling_from_config(section: Any, tokenizer: Any) -> SamplingConfig:
  """A `SamplingConfig` from `config.predict`; decoding stops at the tokenizer's eos token."""
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  stop_ids = () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
  return SamplingConfig(
      max_new_tokens=int(section.max_new_tokens), temperature=float(section.temperature),
      top_k=int(section.top_k), top_p=float(section.top_p), stop_token_ids=stop_ids,
      pad_token_id=int(pad_id))


def decode_answer(tokenizer: Any, tokens: Sequence[int]) -> str:
  """Generated tokens as text: special tokens dropped, spaces as the tokens spell them (no
  clean-up, which would rewrite earlier text as a streamed answer grows)."""
  return tokenizer.decode(list(tokens), skip_special_tokens=True,
                          clean_up_tokenization_spaces=False)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the longest). Returns ids, mask [b, len]."""
  length = length or max(len(prompt) for prompt in prompts)
  input_ids = np.full((len(prompts), length), pad_id, np.int32)
  attention_mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f'prompt of {len(prompt)} tokens is longer than {length}')
    if len(prompt):
      input_ids[row, length - len(prompt):] = prompt
      attention_mask[row, length - len(prompt):] = 1
  return input_ids, attention_mask


def padded_stack(rows: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """`rows` stacked and zero-padded to `batch_size` rows."""
  stacked = np.stack(rows)
  padding = np.zeros((batch_size - len(rows), *stacked.shape[1:]), stacked.dtype)
  return np.concatenate([stacked, padding])


def answer_prompts(
    generate: Callable,
    params: Any,
    tokenizer: Any,
    prompts: Sequence[np.ndarray],
    images_of: Callable[[int], dict[str, np.ndarray]],
    *,
    batch_size: int,
    prompt_len: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
  """Generates an answer for each prompt with a function from `make_generate_fn`.

  Every batch has `batch_size` rows and prompts left-padded to `prompt_len`, so `generate`
  compiles once for a given (batch_size, prompt_len), whatever the number of prompts.

  Args:
    generate: the jitted generate function (see `make_generate_fn`).
    params: the VLM's parameters.
    tokenizer: decodes the answers.
    prompts: token ids of each prompt, image tokens expanded.
    images_of: index -> the image inputs of prompt `index` (`examples.image_inputs`: images
      float32 [max_images, H, W, 3], and an anyres model's feature index).
    batch_size, prompt_len: the compiled shape.
    seed: the sampling seed.

  Returns:
    One `{"answer": str, "num_tokens": int}` per prompt, in order.
  """
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  rng, results = jax.random.key(seed), []
  for start in range(0, len(prompts), batch_size):
    chunk = list(range(start, min(start + batch_size, len(prompts))))
    rows = [prompts[i] for i in chunk] + [[]] * (batch_size - len(chunk))
    input_ids, attention_mask = left_pad(rows, pad_id, prompt_len)
    inputs = [images_of(index) for index in chunk]
    batch = {key: padded_stack([row[key] for row in inputs], batch_size)
             for key in inputs[0]}  # images [rows, max_images, H, W, 3], ...
    rng, batch_rng = jax.random.split(rng)
    images = batch.pop('images')
    out = jax.device_get(generate(params, input_ids, attention_mask, images, batch_rng,
                                  **batch))
    for row in range(len(chunk)):
      num_tokens = int(out['num_tokens'][row])
      text = decode_answer(tokenizer, out['tokens'][row, :num_tokens].tolist())
      results.append({'answer': text.strip(), 'num_tokens': num_tokens})
  return results
