"""Chat requests -> prompts and images -> answers, batched into the jitted KV-cache decoder.

Requests wait in a queue; a batcher takes the first, collects the ones that arrive within
`batch_window_ms` (up to `max_batch` rows, `n` rows per request), groups those that can share
one compiled decoder (same sampling settings and max-token bucket; a request with a `seed`
gets its own batch so its samples depend on the seed alone), pads each group to a bucketed
(rows, prompt length) shape and runs it in a worker thread. Shapes come from small sets
(`ROW_BUCKETS`, powers of two for prompts and new tokens), so requests do not recompile.
The window is only waited for while requests come together: when the last batch held one
request, the next one starts at once.

A streamed request's decoder reports each step's tokens to the host (`on_step` of
`inference.make_generate_fn`), and the job's `on_delta(choice, text)` receives the new text
of each choice as it grows; text that may still change (an incomplete character, trailing
whitespace, the possible start of a stop string) is held back until it is settled.
"""

import asyncio
import base64
import binascii
import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from openvlm_jax import inference
from openvlm_jax.data import examples as examples_lib

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
MAX_STOPS = 4  # stop strings per request, as OpenAI allows


class RequestError(ValueError):
  """A request the server refuses: `status` (4xx), `param` (the field), OpenAI's `code`."""

  def __init__(self, message: str, *, status: int = 400, param: str | None = None,
               code: str | None = None):
    super().__init__(message)
    self.status, self.param, self.code = status, param, code


@dataclasses.dataclass(frozen=True)
class Limits:
  """What one request may ask for, and how requests are batched (`config.serve`)."""

  max_new_tokens: int = 64
  max_prompt_tokens: int = 0  # 0: the run's seq_len
  max_image_bytes: int = 8 << 20
  image_root: str = ''  # local image paths are read only below this folder; '': none
  max_batch: int = 8  # rows per decoder call
  batch_window_ms: float = 5.0
  max_queue: int = 64  # requests waiting; more are refused with 429


@dataclasses.dataclass(frozen=True)
class Sampling:
  """The settings that select a compiled decoder (rows with equal ones share a batch)."""

  temperature: float
  top_p: float
  max_new_bucket: int
  seed: int | None
  stream: bool = False


@dataclasses.dataclass(eq=False)  # a job is itself: compared by identity
class Job:
  """One request: its prompt, images, rows to generate and where the answers go."""

  prompt: np.ndarray  # int32 [num_tokens], image tokens widened
  images: dict[str, np.ndarray]  # `examples.image_inputs`: images [slots, H, W, 3], layout
  sampling: Sampling
  max_new_tokens: int
  n: int
  prompt_tokens: int = 0
  stops: tuple[str, ...] = ()
  future: asyncio.Future | None = None  # set by `submit`
  on_delta: Callable[[int, str], None] | None = None  # streamed: (choice, new text)


def _row_bucket(rows: int) -> int:
  """The compiled row count that holds `rows`."""
  return next(size for size in ROW_BUCKETS if size >= rows)


def _bucket(value: int, smallest: int = 16) -> int:
  """The smallest power of two (from `smallest`) holding `value`."""
  size = smallest
  while size < value:
    size *= 2
  return size


def _image_bytes(url: str, limits: Limits) -> bytes:
  """The bytes of an `image_url`: a base64 data URI, or a local path below `image_root`."""
  if url.startswith('data:'):
    header, _, payload = url.partition(',')
    if ';base64' not in header:
      raise RequestError('image data URIs must be base64', param='messages')
    try:
      data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
      raise RequestError('malformed base64 in an image data URI', param='messages') from None
  else:
    path = url.removeprefix('file://')
    if url.startswith(('http://', 'https://')) or not limits.image_root:
      raise RequestError('only data: URIs (and local files when the server allows a folder) '
                         'are accepted; remote images are not fetched', param='messages')
    root = os.path.realpath(limits.image_root)
    path = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, path]) != root or not os.path.isfile(path):
      raise RequestError(f'no image {url!r} under the allowed folder', param='messages')
    with open(path, 'rb') as f:
      data = f.read(limits.max_image_bytes + 1)
  if len(data) > limits.max_image_bytes:
    raise RequestError(f'an image is larger than {limits.max_image_bytes} bytes',
                       status=413, param='messages')
  return data


def to_record(messages: Sequence[dict[str, Any]], limits: Limits) -> dict[str, Any]:
  """OpenAI chat messages -> a LLaVA record (`conversations`, `image_bytes`).

  Each `image_url` part becomes an `<image>` placeholder where it stands.
  """
  roles = {'system': 'system', 'user': 'human', 'assistant': 'gpt'}
  turns, images = [], []
  for index, message in enumerate(messages):
    role, content = message.get('role'), message.get('content')
    if role not in roles:
      raise RequestError(f'messages[{index}].role {role!r} is not one of {sorted(roles)}',
                         param=f'messages[{index}].role')
    if isinstance(content, str):
      text = content
    elif isinstance(content, list):
      pieces = []
      for part in content:
        kind = part.get('type') if isinstance(part, dict) else None
        if kind == 'text' and isinstance(part.get('text'), str):
          pieces.append(part['text'])
        elif kind == 'image_url' and isinstance(part.get('image_url'), dict):
          images.append(_image_bytes(str(part['image_url'].get('url', '')), limits))
          pieces.append('<image>\n')
        else:
          raise RequestError(f'messages[{index}] has a content part that is neither text nor '
                             'image_url', param=f'messages[{index}].content')
      text = ''.join(pieces)
    else:
      raise RequestError(f'messages[{index}].content must be a string or a list of parts',
                         param=f'messages[{index}].content')
    turns.append({'from': roles[role], 'value': text})
  if not turns:
    raise RequestError('messages is empty', param='messages')
  if turns[-1]['from'] != 'human':
    raise RequestError('the last message must be from the user', param='messages')
  return {'conversations': turns, 'image_bytes': images}


class Engine:
  """Batches jobs into `inference.make_generate_fn` decoders over one set of params."""

  def __init__(self, model: Any, params: Any, spec: examples_lib.ExampleSpec,
               tokenizer: Any, limits: Limits):
    self.model, self.params, self.spec = model, params, spec
    self.tokenizer, self.limits = tokenizer, limits
    self.max_prompt_tokens = limits.max_prompt_tokens or spec.seq_len
    self.queue = asyncio.Queue(maxsize=limits.max_queue)  # binds to a loop on first use
    self._generators: dict[tuple, Any] = {}
    self._listener: Callable[[int, np.ndarray, np.ndarray], None] | None = None
    self._decoding = threading.Lock()  # one decoder call at a time owns `_listener`
    self.stats = {'batches': 0, 'rows': 0}

  def prepare(self, messages, *, max_tokens: int | None, temperature: float, top_p: float,
              n: int, seed: int | None, stop: str | Sequence[str] | None = None,
              stream: bool = False) -> Job:
    """Validates a request and encodes it into a Job for `submit` or `run_group`.

    Raises:
      RequestError: a bad field, an unreadable image, or a prompt over the limits.
    """
    max_new = self.limits.max_new_tokens if max_tokens is None else int(max_tokens)
    if not 1 <= max_new <= self.limits.max_new_tokens:
      raise RequestError(f'max_tokens={max_new}: must be in [1, {self.limits.max_new_tokens}]',
                         param='max_tokens')
    if not 0.0 <= temperature <= 2.0:
      raise RequestError(f'temperature={temperature}: must be in [0, 2]', param='temperature')
    if not 0.0 < top_p <= 1.0:
      raise RequestError(f'top_p={top_p}: must be in (0, 1]', param='top_p')
    if not 1 <= n <= self.limits.max_batch:
      raise RequestError(f'n={n}: must be in [1, {self.limits.max_batch}]', param='n')
    stops = tuple(s for s in ([stop] if isinstance(stop, str) else list(stop or ())) if s)
    if len(stops) > MAX_STOPS:
      raise RequestError(f'stop has {len(stops)} strings; at most {MAX_STOPS}', param='stop')
    record = to_record(messages, self.limits)
    try:
      prompt, _ = examples_lib.encode_prompt(record, self.spec)
      images = examples_lib.image_inputs(record, self.spec, prompt)  # decodes every image
    except ValueError as error:
      raise RequestError(str(error), param='messages') from None
    if len(prompt) > self.max_prompt_tokens:
      raise RequestError(f'the prompt has {len(prompt)} tokens, more than '
                         f'{self.max_prompt_tokens}', param='messages',
                         code='context_length_exceeded')
    greedy = temperature == 0.0
    sampling = Sampling(temperature=float(temperature), top_p=1.0 if greedy else float(top_p),
                        max_new_bucket=_bucket(max_new), seed=None if greedy else seed,
                        stream=bool(stream))
    return Job(prompt=prompt, images=images, sampling=sampling, max_new_tokens=max_new, n=n,
               prompt_tokens=len(prompt), stops=stops)

  def _generate_fn(self, sampling: Sampling):
    key = (sampling.temperature, sampling.top_p, sampling.max_new_bucket, sampling.stream)
    if key not in self._generators:
      settings = inference.SamplingConfig(
          max_new_tokens=sampling.max_new_bucket, temperature=sampling.temperature,
          top_p=sampling.top_p, stop_token_ids=_stop_ids(self.tokenizer),
          pad_token_id=self.spec.pad_id)
      self._generators[key] = inference.make_generate_fn(
          self.model, settings, on_step=self._on_step if sampling.stream else None)
    return self._generators[key]

  def _on_step(self, step, tokens, live) -> None:
    """The streamed decoders' host callback: hands one step's tokens to the running group.

    A failing listener (e.g. a client's event loop gone) is logged, not raised: raising here
    would fail every request of the group.
    """
    if self._listener is None:
      return
    try:
      self._listener(int(step), np.asarray(tokens), np.asarray(live))
    except Exception as error:  # noqa: BLE001
      logging.warning('streaming a step failed: %s', error)

  def warm_up(self, temperature: float = 0.0, streams: Sequence[bool] = (False, True)) -> int:
    """Compiles the decoder for every (rows, prompt length) bucket a request can reach, for
    `temperature` and `max_new_tokens` requests, whole and streamed (`streams`), so that no
    request waits on a compile.

    Returns:
      The number of shapes compiled.
    """
    empty = examples_lib.empty_image_inputs(self.spec)
    prompt_lens = [length for length in (32 * 2 ** i for i in range(16))
                   if length <= _bucket(self.max_prompt_tokens, 32)]
    row_counts = [rows for rows in ROW_BUCKETS if rows <= _row_bucket(self.limits.max_batch)]
    for stream in streams:
      generate = self._generate_fn(Sampling(
          temperature=temperature, top_p=1.0, max_new_bucket=_bucket(self.limits.max_new_tokens),
          seed=None, stream=stream))
      for rows in row_counts:
        inputs = {key: np.stack([value] * rows) for key, value in empty.items()}
        pixels = inputs.pop('images')
        for prompt_len in prompt_lens:
          input_ids, attention_mask = inference.left_pad([[self.spec.pad_id]] * rows,
                                                         self.spec.pad_id, prompt_len)
          jax.block_until_ready(generate(self.params, input_ids, attention_mask, pixels,
                                         jax.random.key(0), **inputs))
    return len(streams) * len(row_counts) * len(prompt_lens)

  def run_group(self, jobs: list[Job]) -> list[list[dict[str, Any]]]:
    """Generates every row of `jobs` (one sampling setting) in one padded decoder call.

    Returns, per job, one `{'text', 'completion_tokens', 'finish_reason'}` per choice; the
    text is cut before the first of the job's stop strings.
    """
    sampling = jobs[0].sampling
    owners = [(job, choice) for job in jobs for choice in range(job.n)]  # row -> (job, choice)
    prompts = [job.prompt for job, _ in owners]
    images = [job.images for job, _ in owners]
    rows = _row_bucket(len(prompts))
    prompt_len = _bucket(max(len(prompt) for prompt in prompts), 32)
    input_ids, attention_mask = inference.left_pad(
        prompts + [[]] * (rows - len(prompts)), self.spec.pad_id, prompt_len)
    inputs = {key: inference.padded_stack([row[key] for row in images], rows)
              for key in images[0]}  # images [rows, slots, H, W, 3], an anyres layout
    pixels = inputs.pop('images')
    seed = sampling.seed if sampling.seed is not None else time.monotonic_ns()
    streams = [_Stream(job, choice, self.tokenizer) for job, choice in owners]
    with self._decoding:
      if sampling.stream:
        self._listener = lambda step, tokens, live: [
            stream.add(int(token)) for stream, token, alive in zip(streams, tokens, live)
            if alive]
      try:
        out = jax.device_get(self._generate_fn(sampling)(
            self.params, input_ids, attention_mask, pixels, jax.random.key(seed % (1 << 31)),
            **inputs))
      finally:
        self._listener = None
    self.stats['batches'] += 1
    self.stats['rows'] += len(prompts)
    results = {id(job): [] for job in jobs}
    for row, (stream, (job, _)) in enumerate(zip(streams, owners)):
      tokens = out['tokens'][row, :int(out['num_tokens'][row])].tolist()[:job.max_new_tokens]
      results[id(job)].append(stream.finish(tokens))
    return [results[id(job)] for job in jobs]

  def enqueue(self, job: Job) -> asyncio.Future:
    """Queues a job (in the event loop's thread); returns the future of its answers.

    Raises:
      RequestError: 429 when `max_queue` jobs are waiting already.
    """
    job.future = job.future or asyncio.get_running_loop().create_future()
    try:
      self.queue.put_nowait(job)
    except asyncio.QueueFull:
      raise RequestError('too many requests waiting; retry later', status=429,
                         code='rate_limit_exceeded') from None
    return job.future

  async def submit(self, job: Job) -> list[dict[str, Any]]:
    """Queues a job and waits for its answers (429 when the queue is full)."""
    return await self.enqueue(job)

  async def batch_forever(self) -> None:
    """The batcher: collects jobs for `batch_window_ms`, then runs them group by group.

    After a batch of one request the window is skipped (only the jobs already waiting join),
    so a lone client does not wait for company that is not coming.
    """
    together = False  # whether the last batch held more than one request
    while True:
      jobs = [await self.queue.get()]
      window = self.limits.batch_window_ms / 1000 if together else 0.0
      deadline = time.monotonic() + window
      while sum(job.n for job in jobs) < self.limits.max_batch:
        if not self.queue.empty():
          jobs.append(self.queue.get_nowait())
          continue
        remaining = deadline - time.monotonic()
        if remaining <= 0:
          break
        try:
          jobs.append(await asyncio.wait_for(self.queue.get(), remaining))
        except TimeoutError:
          break
      together = len(jobs) > 1
      for group in _groups(jobs, self.limits.max_batch):
        try:
          answers = await asyncio.to_thread(self.run_group, group)
        except Exception as error:  # noqa: BLE001 (the requests fail, the server stays up)
          for job in group:
            if not job.future.done():
              job.future.set_exception(error)
          continue
        for job, choices in zip(group, answers):
          if not job.future.done():
            job.future.set_result(choices)


def _groups(jobs: list[Job], max_rows: int) -> list[list[Job]]:
  """Jobs split into groups of one sampling setting and at most `max_rows` rows; a seeded
  request is a group of its own."""
  groups: list[list[Job]] = []
  open_groups: dict[Sampling, list[Job]] = {}
  for job in jobs:
    group = open_groups.get(job.sampling)
    if (job.sampling.seed is not None or group is None
        or sum(other.n for other in group) + job.n > max_rows):
      group = [job]
      groups.append(group)
      if job.sampling.seed is None:
        open_groups[job.sampling] = group
    else:
      group.append(job)
  return groups


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """The text before the first stop string, and whether one was found."""
  cuts = [text.index(stop) for stop in stops if stop and stop in text]
  return (text[:min(cuts)], True) if cuts else (text, False)


def settled_text(text: str, stops: Sequence[str]) -> tuple[str, bool]:
  """The part of a still-growing answer that later tokens cannot change, and whether a stop
  string ended it: cut at a stop string, else without an incomplete character, trailing
  whitespace or a tail that may begin a stop string."""
  text, stopped = cut_at_stop(text.lstrip(), stops)
  if stopped:
    return text.rstrip(), True
  text = text.rstrip('\ufffd').rstrip()
  for stop in stops:
    for length in range(min(len(stop) - 1, len(text)), 0, -1):
      if text.endswith(stop[:length]):
        text = text[:-length].rstrip()
        break
  return text, False


class _Stream:
  """One choice's tokens as they come, and the text already handed to its job's `on_delta`."""

  def __init__(self, job: Job, choice: int, tokenizer: Any):
    self.job, self.choice, self.tokenizer = job, choice, tokenizer
    self.tokens: list[int] = []
    self.sent = ''
    self.stopped = False

  def _send(self, text: str) -> None:
    """Hands on the text past what was sent. Text that does not extend it (a decode that
    rewrote earlier characters) waits for `finish`; `inference.decode_answer` does no
    clean-up of spaces, the usual cause of such rewrites."""
    if self.job.on_delta is not None and text.startswith(self.sent) and len(text) > len(
        self.sent):
      self.job.on_delta(self.choice, text[len(self.sent):])
      self.sent = text

  def _decode(self, tokens: list[int]) -> str:
    return inference.decode_answer(self.tokenizer, tokens)

  def add(self, token: int) -> None:
    """A newly generated token (streamed decoders, per step)."""
    if self.stopped or len(self.tokens) >= self.job.max_new_tokens:
      return
    self.tokens.append(token)
    text, self.stopped = settled_text(self._decode(self.tokens), self.job.stops)
    self._send(text)

  def finish(self, tokens: list[int]) -> dict[str, Any]:
    """The choice's answer from all its `tokens`; the rest of the text goes to `on_delta`."""
    ended = bool(tokens) and tokens[-1] in _stop_ids(self.tokenizer)
    text, stopped = cut_at_stop(self._decode(tokens).strip(), self.job.stops)
    text = text.rstrip()
    self._send(text)
    return {'text': text, 'completion_tokens': len(tokens),
            'finish_reason': 'stop' if ended or stopped else 'length'}


def _stop_ids(tokenizer) -> tuple[int, ...]:
  return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)

