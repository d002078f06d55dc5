"""The command line as a person meets it: one-line errors (exit 2), a quiet console, a workdir
lock, a diverging run that stops, and a read-only checkpoint folder found before training."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from openvlm_jax import checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/sft.py:model=tiny', '--config.data.batch_size=8',
        '--config.model.vision.image_size=16', '--config.training.progress_bar=False',
        '--config.training.eval_every=0']
ABSL_INFO_LINE = re.compile(r'^I\d{4} ', re.MULTILINE)  # absl's INFO prefix, e.g. "I1201 16:10"


def _env(num_devices=1):
  return dict(os.environ, JAX_PLATFORMS='cpu', TOKENIZERS_PARALLELISM='false',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')


def cli(workdir, *args, num_devices=1, timeout=300):
  """Runs the entry point to the end; returns (exit status, stdout + stderr)."""
  result = subprocess.run(
      [sys.executable, '-m', 'openvlm_jax.main', f'--workdir={workdir}', *args], cwd=REPO,
      env=_env(num_devices), capture_output=True, text=True, timeout=timeout)
  return result.returncode, result.stdout + result.stderr


def _error_line(output):
  lines = [line for line in output.splitlines() if line.strip()]
  assert 'Traceback' not in output, output[-3000:]
  assert lines[-1].startswith('error: '), output[-3000:]
  return lines[-1]


@pytest.mark.parametrize('args, expected', [
    (['--config.optimizer.lrr=0.1'],
     "error: --config.optimizer.lrr: the config has no key 'optimizer.lrr'; did you mean "
     '--config.optimizer.lr?'),
    (['--config.trainin.eval_every=5'], 'did you mean --config.training.eval_every?'),
    (['--config.training.eval_every=-1'], 'error: config.training.eval_every=-1: must be >= 0'),
    (['--config.training.log_every=0'], 'error: config.training.log_every=0: must be >= 1'),
    (['--config.data.batch_size=0'], 'error: config.data.batch_size=0: must be >= 1'),
    (['--config.model.attention_impl=flash'], "config.model.attention_impl='flash': must be one "
                                              'of'),
    (['--config.data.train_files=("/no/such/train.jsonl",)'],
     'error: config.data.train_files[0]: no such file or converted dataset /no/such/train.jsonl'),
])
def test_config_mistakes_are_one_line_naming_the_key(tmp_path, args, expected):
  status, output = cli(tmp_path, *TINY, *args)
  assert status == 2
  assert expected in _error_line(output)
  assert not (tmp_path / 'data').exists()  # nothing was built


def test_batch_that_does_not_split_over_the_devices_names_the_key(tmp_path):
  status, output = cli(tmp_path, *TINY, '--config.data.batch_size=12', num_devices=8)
  assert status == 2
  assert 'config.data.batch_size=12' in _error_line(output) and 'multiple of 8' in output


def test_debug_shows_the_traceback(tmp_path):
  status, output = cli(tmp_path, *TINY, '--config.training.eval_every=-1', '--debug')
  assert status != 0 and 'Traceback' in output and 'UserError' in output


def test_a_bad_train_line_under_raise_is_one_line_with_file_and_line(tmp_path):
  data = tmp_path / 'train.jsonl'
  data.write_text('{"conversations": []}\n{"id": 1}\n')
  status, output = cli(tmp_path / 'run', *TINY, f'--config.data.train_files=("{data}",)',
                       '--config.data.on_bad_record=raise')
  assert status == 2
  assert f'error: {data}:1: ' in _error_line(output)


def test_console_is_quiet_and_a_diverging_run_stops_keeping_the_good_checkpoints(tmp_path):
  good = ['--config.training.checkpoint_every=2', '--config.training.log_every=2']
  status, output = cli(tmp_path, *TINY, *good, '--config.training.num_steps=4')
  assert status == 0, output[-3000:]
  assert not ABSL_INFO_LINE.search(output), output[:3000]  # no Orbax/absl INFO chatter
  assert f'Config written to {tmp_path}/config.json' in output
  assert json.loads((tmp_path / 'config.json').read_text())['training']['num_steps'] == 4
  assert checkpoint.saved_steps(str(tmp_path)) == [2, 4]

  # Resumed with a learning rate that diverges: it stops, names the step, saves nothing, and
  # the keep-2 rotation does not push out the good checkpoints.
  status, output = cli(tmp_path, *TINY, *good, '--config.training.num_steps=40',
                       '--config.optimizer.lr=1e4', '--config.optimizer.clip_norm=1e9')
  assert status == 2
  line = _error_line(output)
  failed_at = int(re.search(r'error: step (\d+): non-finite loss or gradient norm', line)[1])
  assert 'optimizer.lr: 0.002 -> 10000.0' in output  # the changed config was shown
  saved = checkpoint.saved_steps(str(tmp_path))
  assert 4 in saved and max(saved) < failed_at
  assert f'the last good checkpoint is step {max(saved)}' in line

  status, output = cli(tmp_path, *TINY, *good, '--config.training.num_steps=4', '--verbosity=0')
  assert status == 0 and ABSL_INFO_LINE.search(output)  # library logs come back when asked


def test_a_second_run_on_a_locked_workdir_refuses(tmp_path):
  first = subprocess.Popen(
      [sys.executable, '-m', 'openvlm_jax.main', f'--workdir={tmp_path}', *TINY,
       '--config.training.num_steps=100000', '--config.training.checkpoint_every=0'],
      cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 120
    while not (tmp_path / '.lock').exists() or not (tmp_path / '.lock').read_text():
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.1)
    status, output = cli(tmp_path, *TINY, '--config.training.num_steps=2')
    assert status == 2
    assert f'is in use by process {first.pid}' in _error_line(output)
    while not (tmp_path / 'metrics.jsonl').exists():  # training, so SIGTERM saves and stops
      assert first.poll() is None and time.time() < deadline
      time.sleep(0.1)
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=120)
  assert first.returncode == 0
  # The lock went with the process: the next run takes it (and resumes the saved step).
  status, output = cli(tmp_path, *TINY, '--config.training.num_steps=1')
  assert status == 0, output[-3000:]


def _make_unwritable(folder):
  """Root ignores permission bits, so it gets the immutable attribute instead."""
  folder.mkdir(parents=True)
  if os.geteuid() != 0:
    folder.chmod(0o500)
    return lambda: folder.chmod(0o700)
  if subprocess.run(['chattr', '+i', str(folder)], capture_output=True).returncode:
    pytest.skip('cannot make a folder unwritable here (chattr +i failed)')
  return lambda: subprocess.run(['chattr', '-i', str(folder)], check=True)


def test_an_unwritable_checkpoint_folder_fails_before_training(tmp_path):
  undo = _make_unwritable(tmp_path / 'checkpoints')
  try:
    started = time.time()
    status, output = cli(tmp_path, *TINY, '--config.training.num_steps=2')
  finally:
    undo()
  assert status == 2
  assert f'error: cannot write to {tmp_path}/checkpoints' in _error_line(output)
  assert time.time() - started < 60 and not (tmp_path / 'data').exists()
