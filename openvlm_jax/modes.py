"""What each `--mode` of `main.py` does, as plain functions of (config, workdir)."""

import json
import os

from absl import logging
import jax
import ml_collections

from openvlm_jax import checkpoint
from openvlm_jax import evaluation
from openvlm_jax import inference
from openvlm_jax import objectives
from openvlm_jax import parallel
from openvlm_jax.hf import io as hf_io
from openvlm_jax.hf import peft_export
from openvlm_jax.integrations import sqlite_export
from openvlm_jax.training import loop
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import setup
from openvlm_jax.training import step as step_lib


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains or resumes; returns the final eval metrics."""
  return loop.train(config, workdir)


def restore_params(run: setup.Run, step: int = -1):
  """The parameters of checkpoint `step` (-1: the latest) in the run's workdir."""
  manager = checkpoint.make_manager(run.workdir, run.config.training.keep_checkpoints)
  step = manager.latest_step() if step == -1 else step
  if step is None or step not in manager.all_steps():
    which = '' if step is None else f' at step {step}'
    raise FileNotFoundError(f'no checkpoint{which} in {manager.directory} '
                            f'(saved steps: {list(manager.all_steps())})')
  abstract_state = setup.state_layout(run).abstract_state(run.model)
  state = checkpoint.restore(manager, step, abstract_state)
  manager.close()
  return state.params, step


def eval(config: ml_collections.ConfigDict, workdir: str) -> dict:  # pylint: disable=redefined-builtin
  """Evaluates the latest checkpoint on the eval split."""
  run = setup.make_run(config, workdir)
  params, step = restore_params(run)
  eval_step = parallel.under_mesh(
      jax.jit(step_lib.make_eval_step(run.model, objectives.get(config.objective, run.tokenizer)),
              in_shardings=(None, parallel.batch_sharding(run.mesh))),
      run.mesh, config.logical_axis_rules)
  metrics = loop.evaluate(eval_step, params, run)
  if run.has_eval:
    metrics.update(loop.evaluate_generated(params, run))
  logging.info('eval of step %d: %s', step, metrics)
  return dict(step=step, **metrics)


def predict(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Answers config.predict.input (JSONL of images + questions); writes JSONL and SQLite."""
  section = config.predict
  if not section.input:
    raise ValueError('--mode=predict needs --config.predict.input=<questions.jsonl>')
  run = setup.make_run(config, workdir)
  params, step = restore_params(run)
  questions = inference.read_questions(section.input)
  answers = loop.answer(run, params, questions)
  scored = [(a['answer'], q['answer']) for q, a in zip(questions, answers) if q['answer']]
  metrics = evaluation.score_answers(*zip(*scored)) if scored else {}
  output = section.output or os.path.join(workdir, 'predictions.jsonl')
  with open(output, 'w') as f:
    f.writelines(json.dumps({'id': question['id'], 'image': question['image_paths'],
                             'question': question['question'], 'answer': answer['answer'],
                             'reference': question['answer']}) + '\n'
                 for question, answer in zip(questions, answers))
  database = section.database or os.path.join(workdir, 'runs.db')
  run_id = sqlite_export.export_predictions(
      database, questions=questions, answers=answers, config=config.to_dict(), metrics=metrics,
      workdir=os.path.abspath(workdir), checkpoint_step=step,
      input_file=os.path.abspath(section.input))
  logging.info('predict: %d answers -> %s and %s (run %s)', len(answers), output, database, run_id)
  return dict(step=step, run_id=run_id, output=output, database=database, **metrics)


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes a checkpoint as a Hugging Face LLaVA folder, or its LoRA adapters as a PEFT folder."""
  export = config.export
  if not export.dir:
    raise ValueError('--mode=export needs --config.export.dir=<folder>')
  if export.format not in ('merged', 'peft'):
    raise ValueError(f"config.export.format={export.format!r}: expected 'merged' or 'peft'")
  run = setup.make_run(config, workdir)
  params, step = restore_params(run, export.step)
  params = jax.device_get(params)
  if config.model.prefix_attention:
    logging.warning('config.model.prefix_attention is on, but LLaVA in transformers attends '
                    'causally, so the exported model will not reproduce the outputs of this one.')
  if export.format == 'merged':
    hf_io.export_folder(export.dir, run.vlm_config, params, run.tokenizer, dtype=export.dtype)
  else:
    base_model = export.base_model or config.model.init_from
    if not config.lora.rank or not base_model:
      raise ValueError('--config.export.format=peft needs LoRA (config.lora.rank > 0) and a '
                       'base model (config.export.base_model or config.model.init_from)')
    peft_export.save_adapter(export.dir, run.vlm_config, params,
                             base_model_name_or_path=base_model,
                             full_components=fully_trained_components(config, params),
                             dtype=export.dtype)
  logging.info('exported step %d to %s as %s', step, export.dir, export.format)
  return dict(step=step, dir=os.path.abspath(export.dir), dtype=export.dtype,
              format=export.format)


def fully_trained_components(config: ml_collections.ConfigDict, params) -> tuple[str, ...]:
  """The components ('vision', 'projector', 'llm') with trained weights besides LoRA adapters.

  A PEFT adapter stores those whole (`modules_to_save`), the rest as LoRA A and B.
  """
  mask = optimizer_lib.trainable_fn(config.trainable, lora_on=bool(config.lora.rank))(params)
  trained = set()
  for path, trains in jax.tree_util.tree_flatten_with_path(mask)[0]:
    name = optimizer_lib.path_string(path)
    if trains and not name.rsplit('/', 1)[-1].startswith('lora_'):
      trained.add(name.split('/', 1)[0])
  return tuple(sorted(trained))


def format_result(mode: str, result: dict) -> str:
  """One closing line for the console."""
  if mode in ('train', 'eval') and 'exact_match' in result:
    line = (f"held-out exact match: {result['exact_match']:.4f} "
            f"({result['num_examples']:.0f} examples), token accuracy "
            f"{result['token_accuracy']:.4f}, loss {result['loss']:.4f}")
    if 'generated_relaxed_accuracy' in result:
      line += (f"; generated: exact match {result['generated_exact_match']:.4f}, relaxed "
               f"accuracy {result['generated_relaxed_accuracy']:.4f}")
    return line
  return json.dumps(result)
