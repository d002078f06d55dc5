"""The loop with bad eval data: validated up front, skipped and counted, one set for both evals."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import sft
from openvlm_jax import checkpoint, inference, modes, objectives
from openvlm_jax.console import UserError
from openvlm_jax.data import digits

NUM_GOOD = 6


def _write_eval_file(root, eval_file):
  """`NUM_GOOD` good eval records, then four bad ones of different kinds."""
  with open(eval_file) as f:
    good = f.readlines()[:NUM_GOOD]
  record = json.loads(good[0])
  empty_answer = dict(record, conversations=[record['conversations'][0],
                                             {'from': 'gpt', 'value': '  '}])
  too_long = dict(record, conversations=[record['conversations'][0],
                                         {'from': 'gpt', 'value': ' '.join(['7'] * 200)}])
  lines = good[:3] + ['{"id": "broken", "conversations": [\n'] + good[3:] + [
      json.dumps(dict(record, image='images/missing.png')) + '\n',
      json.dumps(empty_answer) + '\n', json.dumps(too_long) + '\n']
  path = root / 'eval_with_bad_lines.jsonl'
  path.write_text(''.join(lines))
  return str(path)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('loop')
  built = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  return built['train'], _write_eval_file(root / 'data', built['eval'])


def _config(train_file, eval_file):
  config = sft.get_config('model=tiny,steps=2')
  config.data.train_files = (train_file,)
  config.data.eval_files = (eval_file,)
  config.data.batch_size = 8
  config.training.eval_every = 1
  config.training.checkpoint_every = 1
  config.training.progress_bar = False
  config.predict.max_new_tokens = 3
  return config


def test_bad_eval_lines_are_skipped_and_both_evals_count_the_same_examples(
    files, tmp_path, monkeypatch):
  traces = []
  original = inference.sample_tokens
  monkeypatch.setattr(inference, 'sample_tokens',
                      lambda *args: traces.append(1) or original(*args))
  result = modes.train(_config(*files), str(tmp_path))
  assert result['num_examples'] == result['generated_num_examples'] == NUM_GOOD
  with open(tmp_path / 'metrics.jsonl') as f:
    evals = [row for row in map(json.loads, f) if row['split'] == 'eval']
  assert [row['step'] for row in evals] == [1, 2]
  assert all(row['num_examples'] == row['generated_num_examples'] == NUM_GOOD for row in evals)
  # The generate function was traced once (it samples twice per trace), not once per eval.
  assert len(traces) == 2
  assert checkpoint.saved_steps(str(tmp_path)) == [1, 2]


def test_raise_policy_stops_before_training_naming_the_line(files, tmp_path):
  config = _config(*files)
  config.data.on_bad_record = 'raise'
  with pytest.raises(UserError, match=r'eval_with_bad_lines\.jsonl:4: malformed JSON'):
    modes.train(config, str(tmp_path))
  assert checkpoint.saved_steps(str(tmp_path)) == []  # nothing was trained


def test_an_eval_file_with_no_usable_record_stops_at_start(files, tmp_path):
  config = _config(*files)
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n')
  config.data.eval_files = (str(empty),)
  with pytest.raises(UserError, match='no usable records'):
    modes.train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'checkpoints').exists() or not checkpoint.saved_steps(
      str(tmp_path / 'run'))


def test_resume_refuses_a_change_of_model_shape_and_warns_of_others(files, tmp_path, capsys):
  config = _config(*files)
  config.data.eval_files = ()
  config.training.num_steps = 1
  modes.train(config, str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['training']['num_steps'] == 1
  wider = config.copy_and_resolve_references()
  wider.model.llm.intermediate_size = 96
  with pytest.raises(UserError, match=r'model\.llm\.intermediate_size: 64 -> 96'):
    modes.train(wider, str(tmp_path))
  longer = config.copy_and_resolve_references()
  longer.training.num_steps = 2
  longer.optimizer.lr = 1e-3
  capsys.readouterr()
  modes.train(longer, str(tmp_path))
  printed = capsys.readouterr().out
  assert 'optimizer.lr: 0.002 -> 0.001' in printed and 'training.num_steps: 1 -> 2' in printed
  assert checkpoint.saved_steps(str(tmp_path)) == [1, 2]
  assert np.isfinite(json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])['loss'])


def _make_margin_objective(section, tokenizer):
  """An objective written outside `objectives/`: a hinge on the target logit's margin."""
  del section, tokenizer

  def terms(batch, logits_fn):
    logits = logits_fn(batch).astype(jnp.float32)  # [batch, seq, vocab]
    mask = batch['loss_mask'] * batch.get('example_mask', jnp.ones(logits.shape[:1]))[:, None]
    target = jnp.take_along_axis(logits, batch['targets'][..., None], axis=-1)[..., 0]
    runner_up = jnp.max(jnp.where(jax.nn.one_hot(batch['targets'], logits.shape[-1]) > 0,
                                  -jnp.inf, logits), axis=-1)
    hinge = jax.nn.relu(1.0 - (target - runner_up))
    return dict(counts(batch), hinge_sum=jnp.sum(hinge * mask),
                wins=jnp.sum((target > runner_up) * mask))

  def counts(batch):
    example_mask = batch.get('example_mask', jnp.ones(batch['targets'].shape[:1]))
    return {'targets': jnp.sum(batch['loss_mask'] * example_mask[:, None]),
            'num_examples': jnp.sum(example_mask)}

  def metrics(sums):
    return {'margin_win_rate': sums['wins'] / jnp.maximum(sums['targets'], 1.0),
            'mean_hinge': sums['hinge_sum'] / jnp.maximum(sums['targets'], 1.0),
            'num_examples': sums['num_examples']}

  return objectives.Objective(name='margin', terms=terms, counts=counts,
                              loss=(('hinge_sum', 1.0, 'targets'),), metrics=metrics,
                              shown=('margin_win_rate',))


def test_an_objective_defined_outside_objectives_trains_through_the_real_loop(
    files, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(objectives.FACTORIES, 'margin', _make_margin_objective)
  config = _config(*files)
  config.objective.name = 'margin'
  config.training.num_steps = 3
  config.training.log_every = 1
  config.training.eval_every = 3
  result = modes.train(config, str(tmp_path))
  assert set(result) >= {'margin_win_rate', 'mean_hinge', 'loss', 'num_examples'}
  assert result['num_examples'] == result['generated_num_examples'] == NUM_GOOD
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  train_rows = [row for row in rows if row['split'] == 'train']
  assert [row['step'] for row in train_rows] == [1, 2, 3]
  assert all(row['loss'] == pytest.approx(row['mean_hinge'], rel=1e-5) for row in train_rows)
  assert 'exact_match' not in train_rows[0] and 'token_accuracy' not in train_rows[0]
  assert 'margin_win_rate' in capsys.readouterr().out
  closing = modes.format_result('train', result)
  assert closing.startswith(f"held-out margin win rate: {result['margin_win_rate']:.4f} "
                            f'({NUM_GOOD} examples), mean hinge ')


def test_the_quantitative_run_logs_its_number_token_loss(files, tmp_path):
  config = _config(*files)
  config.objective.name = 'quantitative'
  config.training.log_every = 1
  config.training.eval_generate = False
  modes.train(config, str(tmp_path))
  with open(tmp_path / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert all(np.isfinite(row['ntl']) and row['ntl'] > 0 for row in rows)
  assert {row['split'] for row in rows} == {'train', 'eval'}


def _pair_file(train_file, name, count=64):
  """Preference pairs from digit records: the true digit chosen, the next digit rejected
  (written beside `train_file`, whose folder holds the images)."""
  path = os.path.join(os.path.dirname(train_file), name)
  with open(train_file) as f:
    records = [json.loads(line) for line, _ in zip(f, range(count))]
  with open(path, 'w') as f:
    for record in records:
      answer = record['conversations'][-1]['value']
      f.write(json.dumps(dict(record, conversations=record['conversations'][:-1], chosen=answer,
                              rejected=str((int(answer) + 1) % 10))) + '\n')
  return str(path)


def test_a_dpo_run_resumes_exactly(files, tmp_path, interrupted_run):
  pairs = _pair_file(files[0], 'pairs.jsonl')
  config = _config(pairs, pairs)
  config.objective = ml_collections.ConfigDict({'name': 'dpo', 'beta': 0.5, 'sft_weight': 0.5})
  config.lora.rank, config.lora.targets, config.trainable = 4, (r'llm/.*',), ()
  config.optimizer.warmup_steps = 0
  config.training.num_steps, config.training.log_every = 4, 1
  config.training.checkpoint_every, config.training.eval_every = 2, 4
  config.training.eval_generate = False
  straight = modes.train(config, str(tmp_path / 'straight'))
  interrupted_run(config, str(tmp_path / 'resumed'), stop_step=2)
  resumed = modes.train(config, str(tmp_path / 'resumed'))
  rows = {}
  for name in ('straight', 'resumed'):
    with open(tmp_path / name / 'metrics.jsonl') as f:
      rows[name] = {row['step']: row for row in map(json.loads, f) if row['split'] == 'train'}
  for step in (3, 4):
    for key in ('loss', 'reward_margin', 'preference_accuracy', 'grad_norm'):
      assert rows['resumed'][step][key] == rows['straight'][step][key], (step, key)
  assert rows['straight'][4]['reward_margin'] != 0
  assert resumed == straight
