"""On-policy batches (GRPO): the data's prompts, answers sampled from the current params.

Each step the loop reads an ordinary training batch (`examples.make_example`); row i gives
its prompt, the tokens before `prefix_len[i]` (the image tokens, the question and the
assistant header), and its reference answer, the first answer's target tokens (decoded). A
record with several turns is asked its first question. Every prompt is left-padded to
`seq_len` and repeated `group_size` times; the KV-cache sampler (`inference`, compiled once)
answers all rows at once, each row with its own key: the step's, `fold_in(key(seed), step)`,
folded with a hash of the row's prompt and image and with its place in the group. A resumed
run samples what the uninterrupted run sampled, and a prompt's answers do not depend on the
batch around it (its order, the number of processes). Rewards and advantages are computed here, on the
host. The update rows are prompt + answer, [rows, seq_len + max_new_tokens]:

  input_ids       the left-padded prompt, then the answer (pad after its stop token)
  attention_mask  1 at the prompt's and the answer's tokens (the stop token included)
  positions       0.. over those tokens
  targets         input_ids shifted left by one; loss_mask 1 where a target is an answer token
  prefix_len      seq_len for every row (the prompt is the prefix of a prefix LM)
  images          each prompt's images, repeated with it
  advantages      float32 [rows]
"""

import time
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec

from openvlm_jax import inference, parallel
from openvlm_jax.console import UserError
from openvlm_jax.objectives.contract import Rollouts


def first_answer_span(loss_mask: np.ndarray, prefix_len: int) -> tuple[int, int]:
  """[start, end) of the first answer's targets: the run of loss_mask from prefix_len - 1."""
  start = max(int(prefix_len) - 1, 0)
  end = start
  while end < len(loss_mask) and loss_mask[end] > 0:
    end += 1
  return start, end


def prompts_and_references(batch: dict, tokenizer: Any) -> tuple[list[np.ndarray], list[str]]:
  """Each row's prompt token ids and its first answer as text, from a training batch.

  Raises:
    UserError: for a packed batch (prompts need one example per row).
  """
  if 'prefix_end' in batch:
    raise UserError('config.data.packing: GRPO samples answers to one prompt per row; '
                    'set config.data.packing=False')
  prompts, references = [], []
  for row in range(batch['input_ids'].shape[0]):
    prefix_len = int(batch['prefix_len'][row])
    start, end = first_answer_span(batch['loss_mask'][row], prefix_len)
    prompts.append(np.asarray(batch['input_ids'][row, :prefix_len], np.int32))
    answer = batch['targets'][row, start:end].tolist()
    references.append(inference.decode_answer(tokenizer, answer).strip())
  return prompts, references


def update_rows(prompt_ids: np.ndarray, prompt_mask: np.ndarray, answer_ids: np.ndarray,
                answer_lengths: np.ndarray, images: np.ndarray, pad_id: int) -> dict:
  """The rows an update trains on (see the module docstring), without `advantages`.

  prompt_ids, prompt_mask: [rows, prompt_len], left-padded; answer_ids [rows, max_new];
  answer_lengths [rows] (tokens up to and including the stop token); images [rows, ...].
  """
  rows, prompt_len = prompt_ids.shape
  max_new = answer_ids.shape[1]
  answer_mask = (np.arange(max_new)[None, :] < answer_lengths[:, None]).astype(np.int32)
  input_ids = np.concatenate([prompt_ids, np.where(answer_mask > 0, answer_ids, pad_id)], axis=1)
  attention_mask = np.concatenate([prompt_mask, answer_mask], axis=1).astype(np.int32)
  positions = np.maximum(np.cumsum(attention_mask, axis=1) - 1, 0).astype(np.int32)
  targets = np.concatenate([input_ids[:, 1:], np.full((rows, 1), pad_id)], axis=1)
  loss_mask = np.zeros(input_ids.shape, np.float32)
  loss_mask[:, prompt_len - 1:prompt_len - 1 + max_new] = answer_mask  # predicts answer tokens
  return dict(input_ids=input_ids.astype(np.int32), targets=targets.astype(np.int32),
              loss_mask=loss_mask, attention_mask=attention_mask, positions=positions,
              prefix_len=np.full((rows,), prompt_len, np.int32),
              images=np.asarray(images, np.float32))


def row_keys(prompt_ids: np.ndarray, images: np.ndarray, group_size: int, seed: int,
             step: int) -> np.ndarray:
  """uint32 key data [prompts * group_size, 2]: each answer's sampling key, from the seed, the
  step, a CRC-32 of its prompt's tokens and images, and its index within the group."""
  prompt_hashes = np.asarray([zlib.crc32(ids.tobytes() + pixels.tobytes())
                              for ids, pixels in zip(prompt_ids, images)], np.uint32)
  step_key = jax.random.fold_in(jax.random.key(seed), step)
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, prompt_hashes)
  keys = jnp.repeat(keys, group_size, axis=0)
  members = jnp.tile(jnp.arange(group_size, dtype=jnp.uint32), len(prompt_hashes))
  return np.asarray(jax.random.key_data(jax.vmap(jax.random.fold_in)(keys, members)))


def group_stats(rewards: np.ndarray, group_size: int) -> dict[str, float]:
  """Mean reward, the mean within-group std (ddof 1) and the share of groups whose answers
  all got the same reward (their advantages are 0: no signal)."""
  groups = rewards.reshape(-1, group_size)
  spread = groups.std(axis=1, ddof=1)
  return dict(reward=float(rewards.mean()), reward_std=float(spread.mean()),
              flat_groups=float(np.mean(spread == 0)))


class RolloutMaker:
  """Turns training batches into GRPO update batches with the current params.

  Built once per run: its generate function compiles on the first step (one shape:
  batch x group_size rows, prompts of seq_len tokens).
  """

  def __init__(self, *, model: Any, rollouts: Rollouts, tokenizer: Any, mesh: Any,
               rules: Sequence[tuple], seq_len: int, seed: int):
    self.rollouts = rollouts
    self.tokenizer = tokenizer
    self.mesh = mesh
    self.seq_len = seq_len
    self.seed = seed
    self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sampling = inference.SamplingConfig(
        max_new_tokens=rollouts.max_new_tokens, temperature=rollouts.temperature,
        top_k=rollouts.top_k, top_p=rollouts.top_p,
        stop_token_ids=() if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),),
        pad_token_id=int(self.pad_id))
    self._generate = parallel.under_mesh(inference.make_generate_fn(model, sampling), mesh,
                                         rules)

  def sample(self, params: Any, prompts: Sequence[np.ndarray], images: np.ndarray,
             step: int) -> tuple[dict, np.ndarray, list[str]]:
    """Samples group_size answers to each prompt (token ids; images [prompts, ...]). Returns
    (update rows, int32 [rows] answer lengths, the answers' texts), this process's rows; the
    rows of a group are next to each other."""
    group_size = self.rollouts.group_size
    prompt_ids, prompt_mask = inference.left_pad(prompts, self.pad_id, self.seq_len)
    keys = row_keys(prompt_ids, images, group_size, self.seed, step)
    prompt_ids, prompt_mask = (np.repeat(array, group_size, axis=0)
                               for array in (prompt_ids, prompt_mask))
    images = np.repeat(images, group_size, axis=0)
    inputs = parallel.global_batch({'input_ids': prompt_ids, 'attention_mask': prompt_mask,
                                    'images': images, 'keys': keys}, self.mesh)
    out = self._generate(params, inputs['input_ids'], inputs['attention_mask'],
                         inputs['images'], inputs['keys'])
    out = multihost_utils.global_array_to_host_local_array(
        out, self.mesh, PartitionSpec(parallel.BATCH_AXES))
    tokens, lengths = np.asarray(out['tokens']), np.asarray(out['num_tokens'])
    answers = [inference.decode_answer(self.tokenizer, tokens[row, :lengths[row]].tolist()).strip()
               for row in range(len(lengths))]
    rows = update_rows(prompt_ids, prompt_mask, tokens, lengths, images, self.pad_id)
    return rows, lengths, answers

  def __call__(self, params: Any, batch: dict, step: int) -> tuple[dict, dict[str, float]]:
    """The update batch of step `step` (with `advantages`) and its rollout statistics over
    every process's answers: reward, reward_std, flat_groups, each reward's mean
    (`reward_<name>`), answer_tokens (mean answer length) and rollout_tokens_per_second
    (sampling and decoding the texts, this process's rows).

    Rewards get '' as the question: the batch holds the prompt's tokens, not its text, so a
    unit the question names is not stripped from the answers in training.
    """
    start = time.perf_counter()
    prompts, references = prompts_and_references(batch, self.tokenizer)
    rows, lengths, answers = self.sample(params, prompts, batch['images'], step)
    elapsed = time.perf_counter() - start
    references = [reference for reference in references
                  for _ in range(self.rollouts.group_size)]
    total, named = self.rollouts.rewards(answers, references, [''] * len(answers))
    rows['advantages'] = self.rollouts.advantages(total)
    stats = dict(group_stats(total, self.rollouts.group_size),
                 **{f'reward_{name}': float(values.mean()) for name, values in named.items()},
                 answer_tokens=float(lengths.mean()))
    if jax.process_count() > 1:  # every process has as many rows: the mean of their means
      names = sorted(stats)
      gathered = multihost_utils.process_allgather(np.asarray([stats[n] for n in names]))
      stats = dict(zip(names, np.asarray(gathered).reshape(-1, len(names)).mean(0).tolist()))
    stats['rollout_tokens_per_second'] = float(lengths.sum()) / max(elapsed, 1e-9)
    return rows, stats
