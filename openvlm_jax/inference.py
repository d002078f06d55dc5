"""Answer generation: prefill + KV-cache decoding, batched and jitted, with sampling.

The images of a batch go through the vision tower once; the prompt (left-padded, so every
row's last prompt token sits in the same cache slot) fills the KV cache in one pass; then one
token per step is decoded inside a `lax.while_loop` that stops when every row has produced a
stop token or `max_new_tokens` are out. Greedy, temperature, top-k and top-p sampling.
With `config.prefix_attention` (a prefix LM) the prompt is the prefix: the prefill attends
bidirectionally within it, and each generated token causally to everything before it.

  generate = make_generate_fn(model, SamplingConfig(max_new_tokens=8, stop_token_ids=(2,)))
  out = generate(params, input_ids, attention_mask, images)  # out['tokens'] [batch, 8]

`read_questions`, `encode_prompt`, `left_pad` and `answer_questions` turn a JSONL of images
and questions into answer strings with a Hugging Face tokenizer and its chat template.
"""

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from openvlm_jax.data import conversation, jsonl
from openvlm_jax.data import images as images_lib
from openvlm_jax.data import tokenizer as tokenizer_lib
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
  """Picks one token per row from logits [batch, vocab]. Returns int32 [batch]."""
  if sampling.temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / sampling.temperature, top_k=sampling.top_k,
                         top_p=sampling.top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def make_generate_fn(model: VLM, sampling: SamplingConfig) -> Callable:
  """Returns jitted generate(params, input_ids, attention_mask, images=None, rng=None).

  Args of the returned function:
    params: the VLM's parameters ({'vision', 'projector', 'llm'}).
    input_ids: [batch, prompt_len] int32 prompts, LEFT-padded, image tokens expanded.
    attention_mask: [batch, prompt_len], 1 at real prompt tokens.
    images: [batch, max_images, H, W, 3] float32 or None.
    rng: a PRNG key for sampling (unused when greedy).

  Returns of the returned function:
    `tokens` int32 [batch, max_new_tokens] (the stop token included, then `pad_token_id`)
    and `num_tokens` int32 [batch] (tokens up to and including the stop token).
  """
  max_new = sampling.max_new_tokens
  stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
  cache_dtype = layers.to_dtype(model.config.dtype)

  def generate(params, input_ids, attention_mask, images=None, rng=None):
    variables = {'params': params}
    batch, prompt_len = input_ids.shape
    rng = jax.random.key(0) if rng is None else rng
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
        method=VLM.decode)
    rng, step_rng = jax.random.split(rng)
    first_token = sample_tokens(logits[:, -1], step_rng, sampling)

    def keep_going(carry):
      step, done = carry[0], carry[5]
      return (step < max_new) & ~jnp.all(done)

    def decode_one(carry):
      step, token, position, cache, cache_mask, done, tokens, num_tokens, rng = carry
      tokens = tokens.at[:, step].set(jnp.where(done, sampling.pad_token_id, token))
      num_tokens = num_tokens + (~done).astype(jnp.int32)
      done = done | jnp.isin(token, stop_ids)
      slot = prompt_len + step
      cache_mask = jax.lax.dynamic_update_slice(
          cache_mask, jnp.ones((batch, 1), jnp.int32), (0, slot))
      logits, cache = model.apply(
          variables, token[:, None], positions=position[:, None], cache_mask=cache_mask,
          cache=cache, write_index=slot, prefix_len=prefix_len, method=VLM.decode)
      rng, step_rng = jax.random.split(rng)
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


def read_questions(path: str) -> list[dict[str, Any]]:
  """Reads a JSONL of questions about images.

  Each line is `{"id", "image": path | [paths] (optional), "question": str, "answer": str
  (optional)}` or a LLaVA record (`conversations`: the first human turn is the question, the
  first gpt turn the reference answer). Image paths are relative to the file's folder.

  Returns:
    `[{"id", "image_paths": [absolute paths], "question", "answer" (or None)}]`.

  Raises:
    ValueError: `path:line: reason` for a malformed line.
  """
  root, questions = os.path.dirname(os.path.abspath(path)), []
  for line_no, _, line in jsonl.iter_lines(path):
    where = f'{path}:{line_no}'
    try:
      record = json.loads(line)
      images = record.get('image') or []
      images = [images] if isinstance(images, str) else list(images)
      question, answer = record.get('question'), record.get('answer')
      for turn in record.get('conversations') or []:
        role = conversation.ROLES.get(turn.get('from'))
        if role == 'user' and question is None:
          question = turn['value']
        elif role == 'assistant' and answer is None:
          answer = turn['value']
      if not isinstance(question, str):
        raise ValueError('no "question" (or human turn)')  # noqa: TRY004 (bad data)
      questions.append({
          'id': str(record.get('id', f'{os.path.basename(path)}:{line_no}')),
          'image_paths': [jsonl.resolve_image_path(root, image) for image in images],
          'question': question,
          'answer': None if answer is None else str(answer),
      })
    except (ValueError, AttributeError, TypeError, KeyError) as error:
      raise ValueError(f'{where}: {error}') from error
  return questions


def encode_prompt(tokenizer: Any, question: str, *, num_images: int,
                  num_image_tokens: int) -> list[int]:
  """Token ids of a one-question chat, ending with the template's generation prompt."""
  messages = conversation.to_messages(
      [{'from': 'human', 'value': question}, {'from': 'gpt', 'value': ''}],
      num_images=num_images, image_token=tokenizer_lib.image_token_of(tokenizer),
      num_image_tokens=num_image_tokens)[:-1]
  text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  return list(tokenizer(text, add_special_tokens=False)['input_ids'])


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length` (default: the longest). Returns ids, mask [b, len]."""
  length = length or max(len(prompt) for prompt in prompts)
  input_ids = np.full((len(prompts), length), pad_id, np.int32)
  attention_mask = np.zeros((len(prompts), length), np.int32)
  for row, prompt in enumerate(prompts):
    if len(prompt) > length:
      raise ValueError(f'prompt of {len(prompt)} tokens is longer than {length}')
    if prompt:
      input_ids[row, length - len(prompt):] = prompt
      attention_mask[row, length - len(prompt):] = 1
  return input_ids, attention_mask


def answer_questions(
    model: VLM,
    params: Any,
    tokenizer: Any,
    questions: Sequence[dict[str, Any]],
    *,
    sampling: SamplingConfig,
    batch_size: int,
    max_images: int,
    seed: int = 0,
) -> list[dict[str, Any]]:
  """Generates an answer for each question (see `read_questions` for the dict fields).

  All batches are padded to one shape (the longest prompt, `batch_size` rows), so the
  generate function compiles once.

  Returns:
    One `{"answer": str, "num_tokens": int}` per question, in order.
  """
  if not questions:
    return []
  vision = model.config.vision
  prompts = [encode_prompt(tokenizer, q['question'], num_images=len(q['image_paths']),
                           num_image_tokens=vision.num_image_tokens) for q in questions]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  prompt_len = max(len(prompt) for prompt in prompts)
  generate = make_generate_fn(model, sampling)
  rng = jax.random.key(seed)
  results = []
  for start in range(0, len(questions), batch_size):
    chunk = list(range(start, min(start + batch_size, len(questions))))
    rows = [prompts[i] for i in chunk] + [[]] * (batch_size - len(chunk))
    input_ids, attention_mask = left_pad(rows, pad_id, prompt_len)
    size = vision.image_size
    pixels = np.zeros((batch_size, max_images, size, size, 3), np.float32)
    for row, index in enumerate(chunk):
      paths = questions[index]['image_paths']
      if len(paths) > max_images:
        raise ValueError(f"question {questions[index]['id']}: {len(paths)} images, more than "
                         f'max_images={max_images}')
      for slot, path in enumerate(paths):
        pixels[row, slot] = images_lib.load_image(
            path, image_size=size, image_mean=vision.image_mean, image_std=vision.image_std)
    rng, batch_rng = jax.random.split(rng)
    out = jax.device_get(generate(params, input_ids, attention_mask, pixels, batch_rng))
    for row in range(len(chunk)):
      num_tokens = int(out['num_tokens'][row])
      text = tokenizer.decode(out['tokens'][row, :num_tokens].tolist(), skip_special_tokens=True)
      results.append({'answer': text.strip(), 'num_tokens': num_tokens})
  return results
