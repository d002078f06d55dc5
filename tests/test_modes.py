"""`--mode=eval`, `--mode=export` and the serving engine on a tiny run trained from scratch,
and their errors."""

import base64
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from configs import sft
from openvlm_jax import checkpoint, modes
from openvlm_jax.console import UserError
from openvlm_jax.data import digits
from openvlm_jax.hf import io as hf_io
from openvlm_jax.training import setup

NUM_STEPS = 2
NUM_EVAL_RECORDS = 16


def _tiny_config(train_file: str):
  """configs/sft.py:model=tiny on `train_file`: 2 steps, a checkpoint after each."""
  config = sft.get_config(f'model=tiny,steps={NUM_STEPS}')
  config.data.train_files = (train_file,)
  config.data.batch_size = 8
  config.optimizer.warmup_steps = 1  # full-size steps: step 1 and step 2 differ clearly
  config.training.checkpoint_every = 1
  config.training.progress_bar = False
  return config


def _head(path: str, out_path, num_lines: int) -> str:
  """Writes the first `num_lines` lines of a JSONL beside it; returns the new path."""
  with open(path) as f:
    out_path.write_text(''.join(f.readlines()[:num_lines]))
  return str(out_path)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir) of a tiny model trained 2 steps on digits; eval reads 16 records."""
  root = tmp_path_factory.mktemp('modes')
  files = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  config = _tiny_config(_head(files['train'], root / 'data' / 'train_small.jsonl', 64))
  workdir = str(root / 'workdir')
  modes.train(config, workdir)  # no eval files yet: the eval step compiles once, in eval mode
  config.data.eval_files = (
      _head(files['eval'], root / 'data' / 'eval_small.jsonl', NUM_EVAL_RECORDS),)
  config.tokenizer = str(root / 'workdir' / 'tokenizer')
  return config, workdir


def test_eval_reports_metrics_of_the_latest_checkpoint(trained):
  config, workdir = trained
  result = modes.eval(config, workdir)
  assert result['step'] == NUM_STEPS
  assert result['num_examples'] == NUM_EVAL_RECORDS
  assert np.isfinite(result['loss']) and result['loss'] > 0
  assert 0 <= result['token_accuracy'] <= 1 and 0 <= result['exact_match'] <= 1
  assert modes.format_result('eval', result).startswith('held-out exact match: ')


def test_export_bfloat16_of_a_chosen_step_loads_in_transformers(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.export.dir = str(tmp_path)
  config.export.dtype = 'bfloat16'
  config.export.step = 1
  result = modes.export(config, workdir)
  assert result['step'] == 1 and result['dtype'] == 'bfloat16'

  assert json.loads((tmp_path / 'config.json').read_text())['dtype'] == 'bfloat16'
  with safe_open(tmp_path / 'model.safetensors', framework='pt') as f:
    assert {f.get_slice(name).get_dtype() for name in f.keys()} == {'BF16'}
  model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      tmp_path, output_loading_info=True, dtype=torch.float32)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info[key], (key, info[key])
  processor = transformers.AutoProcessor.from_pretrained(tmp_path)
  assert processor.tokenizer.convert_tokens_to_ids('<image>') == model.config.image_token_id

  # The exported tensors are step 1's parameters (not the latest), rounded to bfloat16.
  run = setup.make_run(config, workdir)
  step_1, _ = modes.restore_params(run, 1)
  latest, _ = modes.restore_params(run)
  _, exported = hf_io.load_pretrained(tmp_path)
  embed = ('llm', 'embed_tokens', 'embedding')

  def get(tree):
    return np.asarray(tree[embed[0]][embed[1]][embed[2]], np.float32)

  np.testing.assert_allclose(get(exported), get(step_1), rtol=1e-2, atol=1e-6)
  assert np.abs(get(exported) - get(latest)).max() > np.abs(get(exported) - get(step_1)).max()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=1e-2,
                                                       atol=1e-6),
               exported, jax.device_get(step_1))


def test_export_refuses_a_non_empty_folder_unless_told(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.export.dir = str(tmp_path)
  (tmp_path / 'notes.txt').write_text('keep me')
  with pytest.raises(UserError, match=f'config.export.dir={tmp_path} is not empty'):
    modes.export(config, workdir)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt']
  config.export.overwrite = True
  assert modes.export(config, workdir)['step'] == NUM_STEPS
  assert (tmp_path / 'config.json').exists() and (tmp_path / 'notes.txt').exists()


def test_restore_params_reads_no_optimizer_state(trained, monkeypatch):
  config, workdir = trained
  run = setup.make_run(config, workdir, build_demo=False)
  read = []
  original = checkpoint.ocp.PyTreeCheckpointHandler.restore
  monkeypatch.setattr(checkpoint.ocp.PyTreeCheckpointHandler, 'restore',
                      lambda self, directory, args=None: read.append(args.item) or
                      original(self, directory, args=args))
  params, step = modes.restore_params(run)
  assert step == NUM_STEPS and list(read[0]) == ['params']
  assert jax.tree.structure(params) == jax.tree.structure(
      setup.state_layout(run).abstract_state(run.model).params)


def test_checkpoint_of_another_shape_names_the_tensor_and_both_shapes(trained):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.model.llm.hidden_size = 48
  with pytest.raises(ValueError, match=r'tensor \S+ has shape \(.*32.*\), the model expects '
                                       r'\(.*48.*\)'):
    modes.eval(config, workdir)


def test_eval_without_a_checkpoint_says_so(trained, tmp_path):
  config, _ = trained
  with pytest.raises(UserError, match=f'no checkpoint in {tmp_path / "empty"}'):
    modes.eval(config, str(tmp_path / 'empty'))
  assert not (tmp_path / 'empty').exists()  # nothing was built there


def test_serve_answers_from_an_exported_folder_as_from_its_checkpoint(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.export.dir = str(tmp_path / 'hf')
  modes.export(config, workdir)
  with open(config.data.eval_files[0]) as f:
    record = json.loads(f.readline())
  image = os.path.join(os.path.dirname(config.data.eval_files[0]), record['image'])
  with open(image, 'rb') as f:
    url = 'data:image/png;base64,' + base64.b64encode(f.read()).decode()
  messages = [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                           {'type': 'text', 'text': 'What number is shown?'}]}]
  engines = [modes.serving_engine(config, workdir)]
  config.serve.folder = config.export.dir
  engines.append(modes.serving_engine(config, str(tmp_path / 'served')))  # no checkpoint there
  assert [name for _, name in engines] == ['workdir', 'hf']
  answers = [engine.run_group([engine.prepare(messages, max_tokens=6, temperature=0.0,
                                              top_p=1.0, n=1, seed=None)])[0][0]
             for engine, _ in engines]
  assert answers[0] == answers[1] and answers[0]['completion_tokens'] >= 1
  config.serve.folder = str(tmp_path)  # no config.json
  with pytest.raises(UserError, match='not a Hugging Face folder'):
    modes.serving_engine(config, workdir)
