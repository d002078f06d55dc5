"""Where a run's data and model come from: the embedded datasets and the model sources."""

import functools
import os

import pytest

from configs import charts as charts_config
from configs import quantitative
from openvlm_jax.console import UserError
from openvlm_jax.training import setup

pytest.importorskip('vega_datasets')


def test_the_chart_recipe_builds_its_benchmark_once_and_evaluates_on_val(tmp_path, monkeypatch):
  small = functools.partial(setup.charts.build_chart_dataset, charts_per_series=1,
                            eval_charts_per_series=1)
  monkeypatch.setattr(setup.charts, 'build_chart_dataset', small)
  config = charts_config.get_config()
  with pytest.raises(UserError, match='no demo data'):
    setup.data_files(config, str(tmp_path), build_demo=False)
  train, evaluation = setup.data_files(config, str(tmp_path))
  assert [os.path.basename(p) for p in train + evaluation] == ['train.jsonl', 'val.jsonl']
  assert os.path.exists(tmp_path / 'data' / 'test.jsonl')
  assert setup.data_files(config, str(tmp_path), build_demo=False) == (train, evaluation)


def test_the_sum_recipe_builds_images_of_its_model_size(tmp_path):
  config = quantitative.get_config()
  with config.unlocked():
    config.data.demo_train_repeats = 1
  train, _ = setup.data_files(config, str(tmp_path))
  with open(train[0]) as f:
    assert sum(1 for _ in f) == 1527
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(tmp_path / 'data' / 'images' / 'sum_train_00000.png') as image:
    assert image.size == (config.model.vision.image_size,) * 2


def test_every_model_source_has_a_config_and_weights():
  assert sorted(setup.MODEL_SOURCES) == ['hf_folder', 'scratch', 'stage1']
  assert setup.MODEL_SOURCES['scratch'].params(None, None, {}) is None
