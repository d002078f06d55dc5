"""The serving engine's queue, batcher and streamed text, without a model."""

import asyncio

import numpy as np
import pytest

from openvlm_jax.serving import engine as engine_lib

GREEDY = engine_lib.Sampling(temperature=0.0, top_p=1.0, max_new_bucket=16, seed=None)


def _job(n: int = 1, **fields) -> engine_lib.Job:
  return engine_lib.Job(prompt=np.zeros(3, np.int32),
                        images={'images': np.zeros((1, 4, 4, 3), np.float32)},
                        sampling=GREEDY, max_new_tokens=8, n=n, **fields)


def _engine(**limits) -> engine_lib.Engine:
  return engine_lib.Engine(None, None, None, None,
                           engine_lib.Limits(max_prompt_tokens=32, **limits))


def test_a_full_queue_refuses_with_429_and_keeps_the_waiting_jobs():
  async def scenario():
    engine = _engine(max_queue=2)
    waiting = [engine.enqueue(_job()), engine.enqueue(_job())]
    with pytest.raises(engine_lib.RequestError) as refused:
      engine.enqueue(_job())
    return engine.queue.qsize(), waiting, refused.value

  size, waiting, refused = asyncio.run(scenario())
  assert size == 2 and len(waiting) == 2
  assert refused.status == 429 and refused.code == 'rate_limit_exceeded'


def test_the_window_is_waited_only_while_requests_come_together():
  async def scenario():
    engine = _engine(batch_window_ms=1500.0, max_batch=8)
    batches = []
    engine.run_group = lambda jobs: (batches.append(len(jobs)),
                                     [[{'text': ''}] * job.n for job in jobs])[1]
    batcher = asyncio.create_task(engine.batch_forever())
    # A lone request after a lone one: answered without the 1.5 s window (or this times out).
    await asyncio.wait_for(engine.submit(_job()), 1.0)
    # Requests queued together still share a batch when the window is skipped.
    both = [engine.enqueue(_job()), engine.enqueue(_job())]
    await asyncio.wait_for(asyncio.gather(*both), 1.0)
    # After a shared batch the window is back: a request 0.1 s later joins the first.
    first = engine.enqueue(_job())
    await asyncio.sleep(0.1)
    await asyncio.gather(first, engine.enqueue(_job()))
    batcher.cancel()
    return batches

  assert asyncio.run(scenario()) == [1, 2, 2]


def test_groups_split_by_sampling_rows_and_seed():
  sampled = engine_lib.Sampling(temperature=1.0, top_p=0.9, max_new_bucket=16, seed=None)
  seeded = engine_lib.Sampling(temperature=1.0, top_p=0.9, max_new_bucket=16, seed=3)
  jobs = [_job(n=3), _job(n=3), _job(n=3), _job(), _job(), _job()]
  jobs[3].sampling = sampled
  for job in jobs[4:]:
    job.sampling = seeded
  groups = engine_lib._groups(jobs, max_rows=6)  # pylint: disable=protected-access
  assert [[jobs.index(job) for job in group] for group in groups] == [[0, 1], [2], [3], [4],
                                                                       [5]]


@pytest.mark.parametrize('text, stops, settled, stopped', [
    (' 12', (), '12', False),
    ('12 ', (), '12', False),  # trailing whitespace may be followed by more text
    ('12\ufffd', (), '12', False),  # an incomplete character
    ('12 ST', ('STOP',), '12', False),  # may begin a stop string
    ('12 STOP and more', ('STOP',), '12', True),
    ('12 SX', ('STOP',), '12 SX', False),
])
def test_settled_text(text, stops, settled, stopped):
  assert engine_lib.settled_text(text, stops) == (settled, stopped)


class _Pieces:
  """A tokenizer whose token i decodes to PIECES[i]; 0 is the end of sequence."""

  PIECES = ('</s>', ' 1', '2', ' S', 'TOP', ' x', ' ', '3')
  eos_token_id = 0

  def decode(self, tokens, skip_special_tokens=True, **_):
    return ''.join(self.PIECES[t] for t in tokens if not (skip_special_tokens and t == 0))


@pytest.mark.parametrize('tokens, stops, answer, finish', [
    ([1, 2, 6, 7, 0], (), '12 3', 'stop'),
    ([1, 2, 3, 4, 5, 0], ('STOP',), '12', 'stop'),
    ([1, 2, 3, 5, 6], ('STOP',), '12 S x', 'length'),
])
def test_streamed_deltas_add_up_to_the_answer_and_never_show_a_stop(tokens, stops, answer,
                                                                    finish):
  deltas = []
  job = _job(stops=stops, on_delta=lambda choice, text: deltas.append((choice, text)))
  stream = engine_lib._Stream(job, 1, _Pieces())  # pylint: disable=protected-access
  shown = []
  for token in tokens:
    stream.add(token)
    shown.append(''.join(text for _, text in deltas))
  result = stream.finish(tokens)
  assert result == {'text': answer, 'completion_tokens': len(tokens), 'finish_reason': finish}
  assert ''.join(text for _, text in deltas) == answer
  assert {choice for choice, _ in deltas} == {1}
  assert all(answer.startswith(text) for text in shown)
  assert 'S' not in ''.join(shown[:3]) and len(deltas) >= 2
