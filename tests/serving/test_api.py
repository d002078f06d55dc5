"""The OpenAI-compatible server, driven by the official `openai` client over loopback."""

import base64
import io
import json
import os
import socket
import threading
import time
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

from openvlm_jax import modes
from openvlm_jax.data import digits
from tests import test_modes

openai = pytest.importorskip('openai')
uvicorn = pytest.importorskip('uvicorn')
from openvlm_jax.serving import api

QUESTION = 'What number is shown?'


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """(openai client, engine, model name, a digit image's path below the allowed folder and
  its data URI, config, workdir) of a tiny trained run served on 127.0.0.1."""
  root = tmp_path_factory.mktemp('serve')
  files = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  config = test_modes._tiny_config(  # pylint: disable=protected-access
      test_modes._head(files['train'], root / 'data' / 'train_small.jsonl', 32))  # pylint: disable=protected-access
  workdir = str(root / 'workdir')
  modes.train(config, workdir)
  config.tokenizer = str(root / 'workdir' / 'tokenizer')
  config.serve.max_new_tokens = 8
  config.serve.batch_window_ms = 300.0  # concurrent test requests land in one batch
  config.serve.image_root = str(root / 'data')
  engine, name = modes.serving_engine(config, workdir)
  port = _free_port()
  app = api.make_app(engine, name)
  uv_server = uvicorn.Server(uvicorn.Config(app, host='127.0.0.1', port=port,
                                            log_level='warning'))
  thread = threading.Thread(target=uv_server.run, daemon=True)
  thread.start()
  while not uv_server.started:
    time.sleep(0.05)
  client = openai.OpenAI(base_url=f'http://127.0.0.1:{port}/v1', api_key='unused',
                         max_retries=0)
  with open(files['eval']) as f:
    image_name = json.loads(f.readline())['image']
  image_path = root / 'data' / image_name
  data_uri = 'data:image/png;base64,' + base64.b64encode(image_path.read_bytes()).decode()
  yield client, engine, name, image_name, data_uri, config, workdir
  uv_server.should_exit = True
  thread.join(timeout=10)


def _ask(client, name, image_url, **kwargs):
  return client.chat.completions.create(model=name, messages=[{'role': 'user', 'content': [
      {'type': 'image_url', 'image_url': {'url': image_url}},
      {'type': 'text', 'text': QUESTION}]}], **kwargs)


def test_an_image_question_gets_predicts_greedy_answer(server, tmp_path):
  client, _, name, image_name, data_uri, config, workdir = server
  assert [model.id for model in client.models.list().data] == [name]
  reply = _ask(client, name, data_uri, temperature=0)
  assert reply.object == 'chat.completion' and len(reply.choices) == 1
  assert reply.usage.prompt_tokens > 16 and reply.usage.completion_tokens >= 1
  questions = os.path.join(config.serve.image_root, 'questions.jsonl')  # beside the images
  with open(questions, 'w') as f:
    f.write(json.dumps({'id': 'q', 'image': image_name, 'question': QUESTION}) + '\n')
  config = config.copy_and_resolve_references()
  config.predict.input, config.predict.max_new_tokens = str(questions), 8
  config.predict.output = str(tmp_path / 'out.jsonl')
  config.predict.database = str(tmp_path / 'runs.db')
  modes.predict(config, workdir)
  predicted = json.loads((tmp_path / 'out.jsonl').read_text())['answer']
  assert reply.choices[0].message.content == predicted
  # A local path under the allowed folder is the same image.
  assert _ask(client, name, image_name).choices[0].message.content == predicted


def test_streaming_gives_the_same_answer_as_events(server):
  client, _, name, _, data_uri, _, _ = server
  whole = _ask(client, name, data_uri).choices[0].message.content
  chunks = list(_ask(client, name, data_uri, stream=True))
  assert all(chunk.object == 'chat.completion.chunk' for chunk in chunks)
  assert ''.join(chunk.choices[0].delta.content or '' for chunk in chunks) == whole
  assert chunks[-1].choices[0].finish_reason in ('stop', 'length')


def test_sampled_streams_come_in_pieces_that_add_up_to_each_choice(server):
  client, _, name, _, data_uri, _, _ = server
  fields = {'n': 2, 'temperature': 1.5, 'seed': 11, 'max_tokens': 8}
  whole = [choice.message.content for choice in _ask(client, name, data_uri, **fields).choices]
  pieces = {0: [], 1: []}
  for chunk in _ask(client, name, data_uri, stream=True, **fields):
    for choice in chunk.choices:
      if choice.delta.content:
        pieces[choice.index].append(choice.delta.content)
  assert [''.join(pieces[index]) for index in (0, 1)] == whole
  # Decoded step by step: an answer of several settled pieces arrives in several chunks.
  assert max(len(chunks) for chunks in pieces.values()) > 1, pieces


def test_n_samples_and_a_seed_repeats_them(server):
  client, _, name, _, data_uri, _, _ = server
  first = _ask(client, name, data_uri, n=3, temperature=1.5, seed=7, max_tokens=6)
  again = _ask(client, name, data_uri, n=3, temperature=1.5, seed=7, max_tokens=6)
  assert [choice.index for choice in first.choices] == [0, 1, 2]
  assert ([c.message.content for c in first.choices]
          == [c.message.content for c in again.choices])
  assert first.usage.completion_tokens <= 18


def _png_bytes() -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.mark.parametrize('kind', ['unknown_model', 'bad_base64', 'not_an_image', 'remote_url',
                                  'outside_folder', 'too_many_tokens', 'no_messages',
                                  'bad_role', 'too_large_image'])
def test_bad_requests_get_a_4xx_and_the_server_still_answers(server, kind):
  client, engine, name, _, data_uri, _, _ = server
  cases = {
      'unknown_model': ({'model': 'gpt-9'}, 404),
      'bad_base64': ({'url': 'data:image/png;base64,@@not base64@@'}, 400),
      'not_an_image': ({'url': 'data:image/png;base64,' + base64.b64encode(b'abc').decode()},
                       400),
      'remote_url': ({'url': 'https://example.com/a.png'}, 400),
      'outside_folder': ({'url': '../../etc/passwd'}, 400),
      'too_many_tokens': ({'max_tokens': 10_000}, 400),
      'no_messages': ({'messages': []}, 400),
      'bad_role': ({'messages': [{'role': 'robot', 'content': 'hi'}]}, 400),
      'too_large_image': ({'url': 'data:image/png;base64,' + base64.b64encode(
          _png_bytes() + b'\0' * engine.limits.max_image_bytes).decode()}, 413),
  }
  fields, status = cases[kind]
  url = fields.pop('url', data_uri)
  request = {'model': name, 'messages': [{'role': 'user', 'content': [
      {'type': 'image_url', 'image_url': {'url': url}}, {'type': 'text', 'text': QUESTION}]}]}
  request.update(fields)
  with pytest.raises(openai.APIStatusError) as raised:
    client.chat.completions.create(**request)
  assert raised.value.status_code == status
  error = raised.value.body
  assert error['message'] and error['type'].endswith('_error'), error
  assert _ask(client, name, data_uri).choices[0].message.content is not None


def test_concurrent_requests_share_decoder_calls(server):
  client, engine, name, _, data_uri, _, _ = server
  batches_before, rows_before = engine.stats['batches'], engine.stats['rows']
  with futures.ThreadPoolExecutor(6) as pool:
    replies = list(pool.map(lambda _: _ask(client, name, data_uri), range(6)))
  assert len({reply.choices[0].message.content for reply in replies}) == 1  # greedy
  assert engine.stats['rows'] - rows_before == 6
  assert engine.stats['batches'] - batches_before < 6


def test_warm_up_compiles_every_bucket_a_request_can_reach(server):
  _, engine, name, _, _, _, _ = server
  # max_batch 8 -> rows 1, 2, 4, 8; prompts up to seq_len 48 -> lengths 32 and 64.
  assert engine.warm_up(streams=(False,)) == 4 * 2  # modes.serve also warms streamed ones
  replies_before = engine.stats['rows']
  assert _ask(server[0], name, server[4]).choices[0].message.content is not None
  assert engine.stats['rows'] == replies_before + 1
