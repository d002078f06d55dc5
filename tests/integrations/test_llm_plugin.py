"""The `llm` plugin, driven through llm's own command line in subprocesses."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from openvlm_jax import modes
from openvlm_jax.data import digits
from tests import test_modes

pytest.importorskip('llm')
QUESTION = 'What number is shown?'
MAX_TOKENS = 6


def _llm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
  llm_command = shutil.which('llm', path=os.path.dirname(sys.executable)) or 'llm'
  return subprocess.run([llm_command, *args], capture_output=True, text=True, env=env,
                        timeout=600, check=False)


@pytest.fixture(scope='module')
def registered(tmp_path_factory):
  """(llm's environment, a held-out digit image, --mode=predict's greedy answer for it, the
  llm user folder) for a tiny trained run registered as openvlm-jax/tiny."""
  root = tmp_path_factory.mktemp('llm')
  files = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  config = test_modes._tiny_config(  # pylint: disable=protected-access
      test_modes._head(files['train'], root / 'data' / 'train_small.jsonl', 32))  # pylint: disable=protected-access
  workdir = root / 'workdir'
  modes.train(config, str(workdir))
  with open(files['eval']) as f:
    image_name = json.loads(f.readline())['image']  # relative to the data folder
  questions = root / 'data' / 'questions.jsonl'
  questions.write_text(json.dumps({'id': 'q', 'image': image_name, 'question': QUESTION}) + '\n')
  image = root / 'data' / image_name
  config.predict.input, config.predict.max_new_tokens = str(questions), MAX_TOKENS
  predicted = modes.predict(config, str(workdir))
  with open(predicted['output']) as f:
    answer = json.loads(f.readline())['answer']
  env = dict(os.environ, LLM_USER_PATH=str(root / 'llm_user'))
  done = _llm('openvlm-jax', 'register', 'tiny', str(workdir), env=env)
  assert done.returncode == 0, done.stderr
  return env, image, answer, root / 'llm_user'


def test_llm_answers_an_image_like_predict_and_logs_it(registered):
  env, image, answer, user_folder = registered
  listed = _llm('openvlm-jax', 'runs', env=env)
  assert listed.stdout.startswith('openvlm-jax/tiny: '), listed
  # Streamed (llm's default) and not: the same greedy answer as --mode=predict.
  for flags in ((), ('--no-stream',)):
    done = _llm('-m', 'openvlm-jax/tiny', QUESTION, '-a', str(image), '-o', 'max_tokens',
                str(MAX_TOKENS), *flags, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == answer
  # llm's log (its SQLite database, read back through `llm logs`): both answers, newest first.
  logged = json.loads(_llm('logs', '-n', '2', '--json', env=env).stdout)
  assert [(row['model'], row['prompt'], row['response']) for row in logged] == [
      ('openvlm-jax/tiny', QUESTION, answer)] * 2
  assert logged[0]['options_json'] == {'max_tokens': MAX_TOKENS}
  assert logged[0]['input_tokens'] > 16 and logged[0]['output_tokens'] >= 1
  assert [attachment['path'] for attachment in logged[0]['attachments']] == [str(image)]
  assert (user_folder / 'logs.db').stat().st_size > 0


def test_llm_refuses_a_non_image_attachment_and_an_unknown_run(registered, tmp_path):
  env, _, _, _ = registered
  notes = tmp_path / 'notes.txt'
  notes.write_text('not an image')
  done = _llm('-m', 'openvlm-jax/tiny', QUESTION, '-a', str(notes), env=env)
  assert done.returncode != 0 and 'text/plain' in done.stderr
  done = _llm('openvlm-jax', 'remove', 'nope', env=env)
  assert done.returncode != 0 and "no run registered as 'nope'" in done.stderr
