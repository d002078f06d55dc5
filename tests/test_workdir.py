"""The workdir lock, the writability probe and the written config."""

import json

import pytest

from configs import sft
from openvlm_jax import workdir as workdir_lib
from openvlm_jax.console import UserError


def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
  first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  holder = json.loads((tmp_path / '.lock').read_text())
  with pytest.raises(UserError, match=f"in use by process {holder['pid']} on {holder['host']}"):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert (tmp_path / '.lock').read_text() == ''
  with workdir_lib.WorkdirLock(str(tmp_path)):  # free again
    pass


def test_a_lock_file_left_behind_does_not_block(tmp_path):
  # A killed run leaves its file; the kernel dropped its flock, so the file alone means nothing.
  (tmp_path / '.lock').write_text(json.dumps(dict(pid=999999, host='gone', since='then')))
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert 'gone' not in (tmp_path / '.lock').read_text()


def test_check_writable_names_the_folder(tmp_path):
  workdir_lib.check_writable(str(tmp_path / 'new' / 'folder'))  # made on the way
  (tmp_path / 'file').write_text('')
  with pytest.raises(UserError, match=f'cannot write to {tmp_path}/file/sub'):
    workdir_lib.check_writable(str(tmp_path / 'file' / 'sub'))


def test_config_is_written_as_plain_json(tmp_path):
  config = sft.get_config('model=tiny')
  path = workdir_lib.write_config(str(tmp_path), config)
  written = json.loads(open(path).read())
  assert written['model']['llm']['hidden_size'] == config.model.llm.hidden_size
  assert written['logical_axis_rules'][0] == ['batch', ['data', 'fsdp']]


def test_is_empty_folder(tmp_path):
  assert workdir_lib.is_empty_folder(str(tmp_path / 'missing'))
  assert workdir_lib.is_empty_folder(str(tmp_path))
  (tmp_path / 'x').write_text('')
  assert not workdir_lib.is_empty_folder(str(tmp_path))
