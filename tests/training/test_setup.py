"""Where a run's data and model come from: the embedded datasets and the model sources."""

import dataclasses
import functools
import os

import pytest

from configs import charts as charts_config
from configs import quantitative
from openvlm_jax import config_lib
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


def test_packaged_folders_resolve_to_paths_and_other_keys_stay(tmp_path, monkeypatch):
  from configs import real_weights  # pylint: disable=g-import-not-at-top
  built = []
  monkeypatch.setitem(setup.packaged.FOLDERS, 'smollm2',
                      lambda: built.append('smollm2') or tmp_path / 'smollm2')
  monkeypatch.setitem(setup.packaged.FOLDERS, 'dinov2_small',
                      lambda: built.append('dinov2') or tmp_path / 'dinov2')
  config = real_weights.get_config('stage=1')
  resolved = setup.with_packaged_folders(config)
  assert resolved.model.llm_from == str(tmp_path / 'smollm2')
  assert resolved.model.vision_from == str(tmp_path / 'dinov2')
  assert config.model.llm_from == 'packaged:smollm2'  # the config itself is unchanged
  assert resolved.model.tower_image_size == 56 and resolved.tokenizer == ''
  stage2 = real_weights.get_config('stage=2')
  assert setup.with_packaged_folders(stage2) is stage2  # nothing packaged in it
  assert stage2.lora.rank == 16 and stage2.model.init_from == 'runs/rw1/hf'
  with pytest.raises(UserError, match="unknown packaged weights; known: packaged:smollm2"):
    setup.packaged.resolve('packaged:llama-70b')


def test_only_a_dinov2_tower_reads_another_image_size():
  from openvlm_jax.models.config import LLMConfig, VisionConfig, VLMConfig  # pylint: disable=g-import-not-at-top
  llm = LLMConfig(vocab_size=8, hidden_size=8, intermediate_size=16, num_layers=1,
                  num_heads=2, num_kv_heads=1)
  tower = {'image_size': 224, 'patch_size': 14, 'hidden_size': 8, 'intermediate_size': 16,
           'num_layers': 1, 'num_heads': 2}
  dinov2 = VLMConfig(llm=llm, vision=VisionConfig(kind='dinov2', position_grid=37, **tower))
  resized = setup.with_tower_image_size(dinov2, 56)
  assert (resized.vision.image_size, resized.vision.table_grid,
          resized.vision.num_image_tokens) == (56, 37, 16)
  assert setup.with_tower_image_size(dinov2, 0) is dinov2
  with pytest.raises(UserError, match='not a multiple of the patch size 14'):
    setup.with_tower_image_size(dinov2, 50)
  clip = VLMConfig(llm=llm, vision=VisionConfig(kind='clip', **tower))
  with pytest.raises(UserError, match='only a DINOv2 tower resizes its position table'):
    setup.with_tower_image_size(clip, 56)


def test_a_run_reads_a_weighted_mixture_of_jsonl_and_arrayrecord(tmp_path, capsys):
  from configs import sft  # pylint: disable=g-import-not-at-top
  from openvlm_jax.data import convert, digits  # pylint: disable=g-import-not-at-top
  built = digits.build_digits_dataset(str(tmp_path / 'digits'), seed=0, image_size=16)
  convert.convert_jsonl({'eval': [built['eval']]}, str(tmp_path / 'ar'), show_progress=False)
  config = sft.get_config('model=tiny')
  with config.unlocked():
    config.data.train_files = (built['train'], f'{tmp_path}/ar')  # the single split: eval
    config.data.train_weights = (3.0, 1.0)
    config.data.batch_size, config.data.worker_count = 16, 1
  run = setup.make_run(config, str(tmp_path / 'run'))
  iterator = setup.train_iterator(run)
  try:
    batches = [next(iterator) for _ in range(4)]
  finally:
    iterator.close()
  assert 'data: 1 Grain worker process(es) decode and preprocess images' in capsys.readouterr().out
  # A row comes from the ArrayRecord source when its image is one of the eval digits'.
  spec = setup.example_spec(run)
  source = setup.sources.open_source(f'{tmp_path}/ar')
  eval_images = {setup.examples_lib.load_images(source[i], spec).tobytes()
                 for i in range(len(source))}
  rows = [image.tobytes() for batch in batches for image in batch['images']]
  from_arrayrecord = sum(row in eval_images for row in rows)
  assert 0.15 <= from_arrayrecord / len(rows) <= 0.35, from_arrayrecord  # weight 1 of 4
  with config.unlocked():
    config.data.train_weights = (1.0,)
  with pytest.raises(UserError, match=r'1 weights for 2 train_files'):
    setup.train_iterator(setup.make_run(config, str(tmp_path / 'run')))
  with config.unlocked():
    config.data.train_files = (built['train'], str(tmp_path / 'missing'))
  with pytest.raises(UserError, match=r'config.data.train_files\[1\]: no such file or converted'):
    setup.make_run(config, str(tmp_path / 'run'))


def test_an_anyres_model_is_refused_where_images_are_not_tiled_yet():
  config = quantitative.get_config()
  config.model.init_from = '/models/llava-v1.6-mistral-7b-hf'
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=32, image_token_id=3)
  setup.check_images_are_single_view(config, vlm_config, 'the server')  # single view: fine
  tiled = dataclasses.replace(vlm_config, image_grid_pinpoints=((16, 32), (32, 16)))
  with pytest.raises(UserError, match='init_from=/models/llava-v1.6-mistral-7b-hf: a LLaVA-NeXT'
                     '.* but the server does not tile'):
    setup.check_images_are_single_view(config, tiled, 'the server')


def test_max_tiles_keeps_the_small_grids_of_an_anyres_model():
  config = quantitative.get_config()
  vlm_config = config_lib.build_vlm_config(config.model, vocab_size=32, image_token_id=3)
  size = vlm_config.vision.image_size
  grids = ((size, 2 * size), (2 * size, size), (2 * size, 2 * size), (size, 3 * size))
  tiled = dataclasses.replace(vlm_config, image_grid_pinpoints=grids)
  assert setup.with_tile_limit(tiled, 0) == tiled
  assert setup.with_tile_limit(tiled, 2).image_grid_pinpoints == grids[:2]
  assert setup.with_tile_limit(tiled, 3).image_grid_pinpoints == grids[:2] + grids[3:]
  with pytest.raises(UserError, match=r'^config.data.max_tiles=1: every grid has more than 1 '
                     r'crops \(the smallest has 2\)$'):
    setup.with_tile_limit(tiled, 1)
  with pytest.raises(UserError, match='max_tiles=2: the model does not tile images'):
    setup.with_tile_limit(vlm_config, 2)
