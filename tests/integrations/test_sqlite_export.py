"""`--mode=predict` end to end: answers land in SQLite, sqlite-utils and Datasette read them."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import sqlite_utils

from configs import sft
from openvlm_jax import modes
from openvlm_jax.console import UserError
from openvlm_jax.data import digits

NUM_QUESTIONS = 4  # answered; two more lines are bad


@pytest.fixture(scope='module')
def predicted(tmp_path_factory):
  """A tiny model trained for one step, then --mode=predict on three questions."""
  root = tmp_path_factory.mktemp('predict')
  files = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  config = sft.get_config('model=tiny,steps=1')
  config.data.train_files = (files['train'],)
  config.data.batch_size = 8
  config.training.progress_bar = False
  workdir = str(root / 'workdir')
  modes.train(config, workdir)

  # Two LLaVA records (with reference answers) and one plain question without an answer.
  with open(files['eval']) as f:
    lines = f.readlines()[:2]
  shutil.copy(root / 'data' / json.loads(lines[0])['image'], root / 'data' / 'gauge.png')
  lines.append(json.dumps({'id': 'gauge', 'image': 'gauge.png',
                           'question': '<image>\nWhat pressure does the gauge show?'}) + '\n')
  # Skipped and counted: a missing image (line 4) and a malformed line (line 5).
  lines.append(json.dumps({'id': 'lost', 'image': 'missing.png', 'question': '<image>\nHow?'})
               + '\n')
  lines.append('{"question": \n')
  # No id: named by its line, 6.
  lines.append(json.dumps({'image': 'gauge.png', 'question': '<image>\nAnd this one?'}) + '\n')
  questions_file = root / 'data' / 'questions.jsonl'
  questions_file.write_text(''.join(lines))
  config.predict.input = str(questions_file)
  config.predict.batch_size = 3  # two batches, the second padded
  config.predict.max_new_tokens = 4
  raising = config.copy_and_resolve_references()
  raising.data.on_bad_record = 'raise'
  with pytest.raises(UserError, match=f'{questions_file}:4: image not found'):
    modes.predict(raising, workdir)
  # An output folder that cannot be made is found before anything is generated.
  (root / 'a-file').write_text('')
  config.predict.output = str(root / 'a-file' / 'answers.jsonl')
  with pytest.raises(UserError, match='cannot write to .*a-file'):
    modes.predict(config, workdir)
  config.predict.output = ''
  result = modes.predict(config, workdir)
  return result, root


def test_predict_writes_jsonl_and_a_database_sqlite_utils_reads(predicted):
  result, root = predicted
  assert result['step'] == 1 and result['skipped'] == 2
  with open(result['output']) as f:
    rows = [json.loads(line) for line in f]
  assert [row['id'] for row in rows][-2:] == ['gauge', 'questions.jsonl:6']
  assert len(rows) == NUM_QUESTIONS
  db = sqlite_utils.Database(result['database'])
  assert {'runs', 'examples', 'predictions', 'metrics'} <= set(db.table_names())
  run = db['runs'].get(result['run_id'])
  assert run['checkpoint_step'] == 1 and run['mode'] == 'predict'
  assert json.loads(run['config'])['predict']['max_new_tokens'] == 4
  examples = {row['example_id']: row for row in db['examples'].rows}
  assert json.loads(examples['gauge']['image_paths']) == [str(root / 'data' / 'gauge.png')]
  assert examples['gauge']['reference'] is None
  predictions = {row['example_id']: row for row in db['predictions'].rows}
  assert [predictions[row['id']]['answer'] for row in rows] == [row['answer'] for row in rows]
  assert predictions['gauge']['relaxed_match'] is None  # no reference to score against
  assert all(predictions[row['id']]['relaxed_match'] in (0, 1) for row in rows[:-2])
  assert all(0 < row['num_tokens'] <= 4 for row in predictions.values())
  metrics = {row['name']: row['value'] for row in db['metrics'].rows}
  assert metrics['num_examples'] == NUM_QUESTIONS - 2  # those with a reference answer
  assert 0.0 <= metrics['relaxed_accuracy'] <= 1.0
  assert [row['example_id'] for row in db['examples'].search('pressure')] == ['gauge']
  assert db['predictions'].detect_fts() == 'predictions_fts'


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_datasette_serves_the_database(predicted):
  pytest.importorskip('datasette')
  result, _ = predicted
  port = _free_port()
  server = subprocess.Popen(
      [sys.executable, '-m', 'datasette', 'serve', result['database'], '--host', '127.0.0.1',
       '--port', str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  name = os.path.splitext(os.path.basename(result['database']))[0]
  url = f'http://127.0.0.1:{port}/{name}/predictions.json?_shape=array&_sort=id'
  try:
    deadline, rows = time.monotonic() + 30, None
    while rows is None and time.monotonic() < deadline and server.poll() is None:
      try:
        with urllib.request.urlopen(url, timeout=2) as response:
          rows = json.load(response)
      except OSError:
        time.sleep(0.2)
    assert rows is not None, f'datasette did not answer: {server.stderr.read1().decode()}'
    assert len(rows) == NUM_QUESTIONS
    assert {row['run_id'] for row in rows} == {result['run_id']}
  finally:
    server.terminate()
    try:
      server.wait(timeout=10)
    except subprocess.TimeoutExpired:
      server.kill()
      server.wait(timeout=10)
