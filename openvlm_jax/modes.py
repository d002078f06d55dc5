"""What each `--mode` of `main.py` does, as plain functions of (config, workdir)."""

import json
import os

from absl import logging
import jax
import ml_collections

from openvlm_jax import checkpoint
from openvlm_jax import objectives
from openvlm_jax import parallel
from openvlm_jax.hf import io as hf_io
from openvlm_jax.training import loop
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import setup
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains or resumes; returns the final eval metrics."""
  return loop.train(config, workdir)


def restore_params(run: setup.Run, step: int = -1):
  """The parameters of checkpoint `step` (-1: the latest) in the run's workdir."""
  config = run.config
  optimizer, _ = optimizer_lib.make_optimizer(config.optimizer, config.training.num_steps)
  example_inputs = setup.example_inputs(run)
  shardings = state_lib.state_shardings(run.model, optimizer, example_inputs, run.mesh,
                                        config.logical_axis_rules)
  manager = checkpoint.make_manager(run.workdir, config.training.keep_checkpoints)
  step = manager.latest_step() if step == -1 else step
  if step is None or step not in manager.all_steps():
    raise FileNotFoundError(f'no checkpoint {"" if step is None else step} in {manager.directory}'
                            f' (saved steps: {list(manager.all_steps())})')
  abstract_state = checkpoint.abstract_like(
      jax.eval_shape(lambda: state_lib.create_train_state(
          run.model, optimizer, example_inputs, shardings, jax.random.key(0))), shardings)
  state = checkpoint.restore(manager, step, abstract_state)
  manager.close()
  return state.params, step


def eval(config: ml_collections.ConfigDict, workdir: str) -> dict:  # pylint: disable=redefined-builtin
  """Evaluates the latest checkpoint on the eval split."""
  run = setup.make_run(config, workdir)
  params, step = restore_params(run)
  eval_step = jax.jit(step_lib.make_eval_step(run.model, objectives.get(config.objective.name)),
                      in_shardings=(None, parallel.batch_sharding(run.mesh)))
  metrics = loop.evaluate(eval_step, params, run)
  logging.info('eval of step %d: %s', step, metrics)
  return dict(step=step, **metrics)


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes a checkpoint as a Hugging Face LLaVA folder (weights, config, processor)."""
  if not config.export.dir:
    raise ValueError('--mode=export needs --config.export.dir=<folder>')
  run = setup.make_run(config, workdir)
  params, step = restore_params(run, config.export.step)
  hf_io.export_folder(config.export.dir, run.vlm_config, jax.device_get(params), run.tokenizer,
                      dtype=config.export.dtype)
  logging.info('exported step %d to %s', step, config.export.dir)
  return dict(step=step, dir=os.path.abspath(config.export.dir), dtype=config.export.dtype)


def format_result(mode: str, result: dict) -> str:
  """One closing line for the console."""
  if mode in ('train', 'eval') and 'exact_match' in result:
    return (f"held-out exact match: {result['exact_match']:.4f} "
            f"({result['num_examples']:.0f} examples), token accuracy "
            f"{result['token_accuracy']:.4f}, loss {result['loss']:.4f}")
  return json.dumps(result)
