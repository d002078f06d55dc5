"""Config files: presets, locking, and overrides through the command line."""

import os
import re
import subprocess
import sys

import pytest

from configs import sft
from openvlm_jax import config_lib
from openvlm_jax.console import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sft_config_is_locked_and_names_unknown_keys():
  config = sft.get_config()
  assert config.objective.name == 'sft'
  config.optimizer.lr = 1e-4  # known keys can change
  with pytest.raises(AttributeError, match='lrr'):
    config.optimizer.lrr = 1e-4


def test_presets_are_arguments():
  config = sft.get_config('model=tiny,steps=7')
  assert config.training.num_steps == 7
  assert config.model.llm.hidden_size == config_lib.MODEL_PRESETS['tiny']['llm']['hidden_size']
  with pytest.raises(ValueError, match='modle=tiny'):
    sft.get_config('modle=tiny')
  with pytest.raises(ValueError, match='huge'):
    sft.get_config('model=huge')


def test_build_vlm_config_takes_vocab_from_tokenizer():
  config = sft.get_config('model=tiny')
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=123, image_token_id=5)
  assert vlm_config.llm.vocab_size == 123
  assert vlm_config.image_token_id == 5
  assert vlm_config.vision.num_image_tokens == 4  # (16 / 8) ** 2 patches, class token dropped


def test_a_model_from_scratch_can_tile_its_images_as_llava_next():
  config = sft.get_config('model=tiny')
  assert config_lib.build_vlm_config(config.model, vocab_size=9, image_token_id=5) \
      .image_grid_pinpoints == ()
  config.model.image_grid_pinpoints = ((16, 32), (32, 16))
  config.model.anyres_max_crops = 9
  tiled = config_lib.build_vlm_config(config.model, vocab_size=9, image_token_id=5)
  assert tiled.image_grid_pinpoints == ((16, 32), (32, 16)) and tiled.anyres_max_crops == 9


def test_prefix_attention_is_off_by_default_and_reaches_the_model_config():
  config = sft.get_config('model=tiny')
  assert config.model.prefix_attention is False
  off = config_lib.build_vlm_config(config.model, vocab_size=123, image_token_id=5)
  assert off.prefix_attention is False
  config.model.prefix_attention = True
  on = config_lib.build_vlm_config(config.model, vocab_size=123, image_token_id=5)
  assert on.prefix_attention is True


def test_command_line_rejects_a_mistyped_key(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'openvlm_jax.main', '--config=configs/sft.py',
       f'--workdir={tmp_path}', '--config.optimizer.lrr=0.1'],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert 'did you mean --config.optimizer.lr?' in result.stderr


def test_check_config_names_the_first_bad_key():
  config = sft.get_config('model=tiny')
  config_lib.check_config(config)
  for key, value, message in [
      ('training.checkpoint_every', -2, 'must be >= 0 (0: never)'),
      ('data.batch_size', 6, 'must be a multiple of optimizer.grad_accum_steps=4'),
      ('data.on_bad_record', 'ignore', "must be 'skip' or 'raise'"),
      ('lora.base_dtype', 'nf8', 'must be one of'),
  ]:
    bad = config.copy_and_resolve_references()
    bad.optimizer.grad_accum_steps = 4 if key == 'data.batch_size' else 1
    section, name = key.split('.')
    bad[section][name] = value
    with pytest.raises(UserError, match=re.escape(f'config.{key}={value!r}: {message}')):
      config_lib.check_config(bad)


def test_config_changes_and_which_ones_change_state_shapes():
  config = sft.get_config('model=tiny')
  saved = config.to_dict()
  assert config_lib.config_changes(saved, config) == []  # tuples and lists compare equal
  config.optimizer.lr = 1e-4
  config.model.llm.num_layers = 3
  changes = config_lib.config_changes(saved, config)
  assert changes == [('model.llm.num_layers', 2, 3), ('optimizer.lr', 2e-3, 1e-4)]
  assert [config_lib.changes_state_shapes(key) for key, _, _ in changes] == [True, False]
  assert config_lib.changes_state_shapes('trainable')
  assert not config_lib.changes_state_shapes('model.dtype')


def test_explain_flag_error_suggests_the_closest_full_key():
  argv = ['main', '--config=configs/sft.py:model=tiny', '--config.data.seqlen=9']
  assert config_lib.explain_flag_error(argv, AttributeError('x')) == (
      "--config.data.seqlen: the config has no key 'data.seqlen'; did you mean "
      '--config.data.seq_len?')


def test_model_source_and_runtime_fields():
  config = sft.get_config('model=tiny')
  assert config_lib.model_source(config.model) == 'scratch'
  config.model.init_from = '/models/llava'
  assert config_lib.model_source(config.model) == 'hf_folder'
  config.model.init_from, config.model.llm_from = '', '/models/qwen2'
  with pytest.raises(UserError, match='llm_from and config.model.vision_from go together'):
    config_lib.model_source(config.model)
  config.model.vision_from = '/models/clip'
  assert config_lib.model_source(config.model) == 'stage1'
  assert sorted(config_lib.runtime_fields(config.model)) == sorted(config_lib.RUNTIME_FIELDS)


@pytest.mark.parametrize('name', ['sft', 'quantitative', 'charts', 'small_print'])
def test_every_recipe_passes_the_config_check_and_shows_its_numbers(name):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  config = module.get_config()
  config_lib.check_config(config)  # no placeholder left unset, every choice known
  for key in config_lib.RECIPE_KEYS:
    section, field = key.rsplit('.', 1)
    assert config[section][field] is not None, key


def test_the_chart_recipe_reads_charts_with_the_number_token_loss():
  from configs import charts  # pylint: disable=g-import-not-at-top
  config = charts.get_config('objective=quantitative,kind=mse,weight=1.0')
  assert (config.data.demo_task, config.objective.ntl_kind) == ('charts', 'mse')
  assert config.objective.ntl_weight == 1.0 and config.objective.number_tokens == 'digits'
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=512, image_token_id=3)
  assert vlm_config.vision.num_image_tokens == 64 < config.data.seq_len
