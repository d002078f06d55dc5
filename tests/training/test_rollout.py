"""GRPO rollouts: prompts and references from the real pipeline, update rows that the
training forward reads as the sampler produced them, several updates on one rollout, and a
run through the real loop that resumes exactly."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from configs import grpo as grpo_config
from openvlm_jax import config_lib, modes, objectives
from openvlm_jax.data import digits
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import jsonl
from openvlm_jax.objectives import sft
from openvlm_jax.training import rollout, setup
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('rollout')
  size = config_lib.MODEL_PRESETS['tiny']['vision']['image_size']
  built = digits.build_digits_dataset(str(root / 'data'), image_size=size, task='sum')
  return built['train'], built['eval']


def _config(files, **objective):
  config = grpo_config.get_config('steps=4')
  with config.unlocked():
    config.model = config_lib.model_section('tiny')
    config.model.prefix_attention = True
    config.data.train_files, config.data.eval_files = (files[0],), (files[1],)
    config.data.batch_size = 8  # the tests' 8 CPU devices split it
    config.data.seq_len = 32
    config.lora.rank = 4
    config.optimizer.warmup_steps = 0  # the first update moves the adapters
    config.objective.group_size = 4
    config.objective.update(objective)
    config.training.log_every = 1
    config.training.checkpoint_every = 2
    config.training.eval_every = 4
    config.training.progress_bar = False
    config.predict.max_new_tokens = 3
    config.predict.batch_size = 8
  return config


def _run_and_batch(config, tmp_path):
  run = setup.make_run(config, str(tmp_path))
  iterator = setup.train_iterator(run)
  return run, next(iterator)


def test_prompts_and_references_are_each_rows_question_and_answer(files, tmp_path):
  run, batch = _run_and_batch(_config(files), tmp_path)
  spec = setup.example_spec(run)
  expected = set()
  with open(files[0]) as f:
    for number, line in enumerate(f, 1):
      record = jsonl.parse_record(line, files[0], number)
      prompt, reference = examples_lib.encode_prompt(record, spec)
      expected.add((tuple(prompt.tolist()), reference))
  prompts, references = rollout.prompts_and_references(batch, run.tokenizer)
  assert len(prompts) == 8
  for prompt, reference in zip(prompts, references):
    assert (tuple(prompt.tolist()), reference) in expected
    assert reference.isdigit()


def test_update_rows_give_back_the_sampled_answers_under_the_training_forward(files, tmp_path):
  config = _config(files)
  run, batch = _run_and_batch(config, tmp_path)
  layout = setup.state_layout(run)
  state = state_lib.create_train_state(run.model, layout.optimizer, layout.example_inputs,
                                       layout.shardings, jax.random.key(0))
  objective = objectives.get(config.objective, run.tokenizer)
  greedy = dataclasses.replace(objective.rollouts, temperature=0.0, max_new_tokens=6)
  maker = rollout.RolloutMaker(model=run.model, rollouts=greedy, tokenizer=run.tokenizer,
                               mesh=run.mesh, rules=config.logical_axis_rules,
                               seq_len=config.data.seq_len, seed=0)
  prompts, _ = rollout.prompts_and_references(batch, run.tokenizer)
  rows, lengths, answers = maker.sample(state.params, prompts, batch['images'], step=1)
  assert rows['input_ids'].shape == (32, config.data.seq_len + 6) and len(answers) == 32
  assert (rows['loss_mask'].sum(1) == lengths).all() and (lengths >= 1).all()
  # The KV-cache decoder chose each answer token as the argmax; the training forward over
  # the update rows (left-padded prompt as the prefix, then the answer) must agree.
  logits = jax.jit(lambda p, b: step_lib.model_logits(run.model, p, b))(state.params, rows)
  argmax = np.asarray(logits).argmax(-1)
  answer = rows['loss_mask'] > 0
  np.testing.assert_array_equal(argmax[answer], rows['targets'][answer])
  # The rows of a group share the prompt, so greedy answers agree within each group.
  assert len({tuple(rows['input_ids'][i]) for i in range(4)}) == 1


def test_two_updates_on_one_rollout_equal_two_steps_with_the_rollouts_log_probs(files, tmp_path):
  config = _config(files, num_updates=2, beta=0.0)
  run, batch = _run_and_batch(config, tmp_path)
  layout = setup.state_layout(run)
  objective = objectives.get(config.objective, run.tokenizer)
  state = state_lib.create_train_state(run.model, layout.optimizer, layout.example_inputs,
                                       layout.shardings, jax.random.key(0))
  maker = setup.make_rollout_maker(run, objective)
  rows, stats = maker(state.params, batch, step=1)
  rows['advantages'] = np.linspace(-1, 1, len(rows['advantages'])).astype(np.float32)
  assert {'reward', 'reward_std', 'flat_groups', 'reward_numeric', 'answer_tokens',
          'rollout_tokens_per_second'} <= set(stats)
  make = lambda updates: jax.jit(step_lib.make_train_step(
      run.model, objective, layout.optimizer, layout.schedule, trainable=layout.trainable,
      num_updates=updates))
  two_state, two_metrics = make(2)(state, rows)
  old_logps = -np.asarray(jax.jit(lambda p, b: sft.token_cross_entropy(  # temperature 1
      step_lib.model_logits(run.model, p, b), b['targets']))(state.params, rows))
  one_step = make(1)
  manual, first = one_step(state, dict(rows, old_logps=old_logps))
  manual, second = one_step(manual, dict(rows, old_logps=old_logps))
  for a, b in zip(jax.tree.leaves(two_state.params), jax.tree.leaves(manual.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(first['mean_ratio'], 1.0, rtol=1e-6)
  assert abs(float(second['mean_ratio']) - 1.0) > 1e-5  # the second update sees a ratio
  np.testing.assert_allclose(two_metrics['loss'], (first['loss'] + second['loss']) / 2,
                             rtol=1e-5)
  assert int(two_state.step) == 1


def _train_rows(workdir):
  with open(workdir / 'metrics.jsonl') as f:
    return {row['step']: row for row in map(json.loads, f) if row['split'] == 'train'}


def length_reward(answer: str, reference: str, question: str) -> float:
  """A reward an untrained model's answers already spread over (the numeric one is 0)."""
  del reference, question
  return len(answer) / 10


def test_a_grpo_run_trains_through_the_loop_and_resumes_exactly(files, tmp_path, capsys,
                                                                interrupted_run):
  config = _config(files, rewards=((f'{__name__}:length_reward', 1.0), ('numeric', 1.0)))
  straight = modes.train(config, str(tmp_path / 'straight'))
  assert {'exact_match', 'generated_relaxed_accuracy', 'loss'} <= set(straight)
  out = capsys.readouterr().out
  assert 'reward' in out and 'kl' in out
  rows = _train_rows(tmp_path / 'straight')
  assert sorted(rows) == [1, 2, 3, 4]
  assert all(rows[step]['reward_std'] > 0 and rows[step]['grad_norm'] > 0 for step in rows)
  assert all(rows[step]['kl'] >= 0 for step in rows) and rows[4]['kl'] > 0
  np.testing.assert_allclose(rows[1]['kl'], 0.0, atol=1e-6)  # the policy starts as reference
  np.testing.assert_allclose(rows[1]['mean_ratio'], 1.0, atol=1e-6)

  # The same run stopped right after its step-2 checkpoint, then resumed.
  interrupted_run(config, str(tmp_path / 'resumed'), stop_step=2)
  resumed = modes.train(config, str(tmp_path / 'resumed'))
  again = _train_rows(tmp_path / 'resumed')
  for step in (3, 4):
    for name in ('loss', 'reward', 'reward_std', 'kl', 'answer_tokens', 'grad_norm'):
      assert again[step][name] == rows[step][name], (step, name)
  assert resumed['generated_relaxed_accuracy'] == straight['generated_relaxed_accuracy']
  assert resumed['loss'] == straight['loss']
