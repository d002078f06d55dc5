"""Config files: presets, locking, and overrides through the command line."""

import os
import subprocess
import sys

import pytest

from configs import sft
from openvlm_jax import config_lib

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
  assert result.returncode != 0
  assert 'lrr' in result.stderr
