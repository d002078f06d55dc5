"""What each `--mode` of `main.py` does, as plain functions of (config, workdir)."""

import json
import os
import time

import jax
import ml_collections
from absl import logging

from openvlm_jax import checkpoint, objectives
from openvlm_jax import workdir as workdir_lib
from openvlm_jax.console import UserError, say
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.hf import io as hf_io
from openvlm_jax.hf import peft_export
from openvlm_jax.integrations import sqlite_export
from openvlm_jax.training import evaluate, loop, setup
from openvlm_jax.training import optimizer as optimizer_lib


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains or resumes; returns the final eval metrics."""
  return loop.train(config, workdir)


def restore_params(run: setup.Run, step: int = -1, layout: setup.StateLayout | None = None):
  """The parameters (only; no optimizer state) of checkpoint `step` (-1: the latest).

  `layout` is the run's `setup.state_layout`, when the caller has it already.
  """
  step = checkpoint.require_step(run.workdir, step)
  manager = checkpoint.make_manager(run.workdir, run.config.training.keep_checkpoints)
  layout = layout or setup.state_layout(run)
  abstract_params = layout.abstract_state(run.model).params
  params = checkpoint.restore_params(manager, step, abstract_params)
  manager.close()
  return params, step


def restored_evaluator(run: setup.Run, eval_set: evaluate.EvalSet,
                       objective: objectives.Objective | None = None):
  """(the run's evaluator over `eval_set`, the latest checkpoint's params, its step).

  With `objective` (an eval), the evaluator computes its metrics, and gets the frozen
  reference copy if they read one; without (predict), it only generates.
  """
  layout = setup.state_layout(run)
  reference = None
  if objective is not None and objectives.for_evaluation(objective).reference:
    reference = setup.reference_params(run, objective, layout)
  objective = objective or objectives.get(run.config.objective, run.tokenizer)
  evaluator = setup.make_evaluator(run, eval_set, objective, layout.shardings.params,
                                   reference=reference)
  params, step = restore_params(run, layout=layout)
  return evaluator, params, step


def eval(config: ml_collections.ConfigDict, workdir: str) -> dict:  # pylint: disable=redefined-builtin
  """Evaluates the latest checkpoint on the eval split: teacher-forced and generated."""
  checkpoint.require_step(workdir)
  run = setup.make_run(config, workdir, build_demo=False)
  if not run.has_eval:
    raise UserError('--mode=eval needs eval data: --config.data.eval_files=<file.jsonl>')
  objective = objectives.get(run.config.objective, run.tokenizer)
  eval_set = setup.load_eval_set(run, pairs=objective.pairs)
  evaluator, params, step = restored_evaluator(run, eval_set, objective)
  metrics = evaluator.teacher_forced(params)
  answers = evaluator.answers(params)
  metrics.update(evaluate.score(answers, eval_set))
  logging.info('eval of step %d: %s', step, metrics)
  by_type = evaluate.score_by_type(answers, eval_set)
  if by_type:  # records labelled with a `question_type` (e.g. the chart benchmark)
    say(evaluate.format_by_type(by_type))
    return dict(step=step, **metrics, by_question_type=by_type)
  return dict(step=step, **metrics)


def predict(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Answers config.predict.input (JSONL of images + questions); writes JSONL and SQLite.

  Bad questions are skipped and counted (or stop the run) as `config.data.on_bad_record`
  says; the output files' folders are checked before anything is generated.
  """
  section = config.predict
  if not section.input:
    raise UserError('--mode=predict needs --config.predict.input=<questions.jsonl>')
  if not os.path.isfile(section.input):  # answers name their images by path
    raise UserError(f'config.predict.input: no such JSONL file {section.input}')
  output = section.output or os.path.join(workdir, 'predictions.jsonl')
  database = section.database or os.path.join(workdir, 'runs.db')
  checkpoint.require_step(workdir)
  for path in (output, database):
    workdir_lib.check_writable(os.path.dirname(os.path.abspath(path)))
  run = setup.make_run(config, workdir, build_demo=False)
  questions = setup.load_eval_set(run, [section.input], check=examples_lib.check_question)
  evaluator, params, step = restored_evaluator(run, questions)
  answers = evaluator.answers(params)
  metrics = evaluate.score(answers, questions, prefix='')
  rows = [question_row(questions, i) for i in range(len(questions))]
  with open(output, 'w') as f:
    f.writelines(json.dumps({'id': row['id'], 'image': row['image_paths'],
                             'question': row['question'], 'answer': answer['answer'],
                             'reference': row['answer']}) + '\n'
                 for row, answer in zip(rows, answers))
  run_id = sqlite_export.export_predictions(
      database, questions=rows, answers=answers, config=config.to_dict(), metrics=metrics,
      workdir=os.path.abspath(workdir), checkpoint_step=step,
      input_file=os.path.abspath(section.input))
  say(f'predict: {len(answers)} answers -> {output} and {database} (run {run_id}); '
      f'{questions.bad_records.count} bad question(s) skipped')
  return dict(step=step, run_id=run_id, output=output, database=database,
              skipped=questions.bad_records.count, **metrics)


def question_row(questions: evaluate.EvalSet, index: int) -> dict:
  """Record `index` of `questions` as the flat row predictions are written with."""
  record = questions.record(index)
  return {'id': record['id'], 'image_paths': record.get('image_paths') or [],
          'question': questions.questions[index], 'answer': questions.references[index]}


def export(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Writes a checkpoint as a Hugging Face LLaVA folder, or its LoRA adapters as a PEFT folder."""
  export = config.export
  if not export.dir:
    raise UserError('--mode=export needs --config.export.dir=<folder>')
  if export.format not in ('merged', 'peft'):
    raise UserError(f"config.export.format={export.format!r}: expected 'merged' or 'peft'")
  if not export.overwrite and not workdir_lib.is_empty_folder(export.dir):
    raise UserError(f'config.export.dir={export.dir} is not empty; pick a new folder or pass '
                    '--config.export.overwrite=True')
  checkpoint.require_step(workdir, export.step)
  if export.format == 'peft' and (not config.lora.rank
                                  or not (export.base_model or config.model.init_from)):
    raise UserError('--config.export.format=peft needs LoRA (config.lora.rank > 0) and a '
                    'base model (config.export.base_model or config.model.init_from)')
  run = setup.make_run(config, workdir, build_demo=False)
  params, step = restore_params(run, export.step)
  params = jax.device_get(params)
  if config.model.prefix_attention:
    logging.warning('config.model.prefix_attention is on, but LLaVA in transformers attends '
                    'causally, so the exported model will not reproduce the outputs of this one.')
  if export.format == 'merged':
    hf_io.export_folder(export.dir, run.vlm_config, params, run.tokenizer, dtype=export.dtype)
  else:
    peft_export.save_adapter(export.dir, run.vlm_config, params,
                             base_model_name_or_path=export.base_model or config.model.init_from,
                             full_components=fully_trained_components(config, params),
                             dtype=export.dtype)
  say(f'exported step {step} to {export.dir} as {export.format}')
  return dict(step=step, dir=os.path.abspath(export.dir), dtype=export.dtype,
              format=export.format)


def serving_engine(config: ml_collections.ConfigDict, workdir: str):
  """(the engine over the params to serve, the model's name) for `serve`.

  The params are the workdir's latest checkpoint, or with `config.serve.folder` a Hugging
  Face LLaVA folder (such as `--mode=export` writes) with its own tokenizer.
  """
  from openvlm_jax.serving import engine as engine_lib  # pylint: disable=g-import-not-at-top
  section = config.serve
  if section.folder:
    run = setup.make_run(folder_config(config, section.folder), workdir, build_demo=False,
                         with_data=False)
    params = setup.pretrained_params(run, setup.state_layout(run).shardings.params)
    source, name = section.folder, os.path.basename(os.path.abspath(section.folder))
  else:
    checkpoint.require_step(workdir)
    run = setup.make_run(config, workdir, build_demo=False, with_data=False)
    params, step = restore_params(run)
    source, name = f'step {step} of {workdir}', os.path.basename(os.path.abspath(workdir))
  limits = engine_lib.Limits(
      max_new_tokens=section.max_new_tokens, max_prompt_tokens=section.max_prompt_tokens,
      max_image_bytes=section.max_image_bytes, image_root=section.image_root,
      max_batch=section.max_batch, batch_window_ms=section.batch_window_ms,
      max_queue=section.max_queue)
  engine = engine_lib.Engine(run.model, params, setup.example_spec(run), run.tokenizer, limits)
  name = section.model_name or name
  logging.info('serving %s as %s', source, name)
  return engine, name


def folder_config(config: ml_collections.ConfigDict, folder: str) -> ml_collections.ConfigDict:
  """`config` set to load a Hugging Face LLaVA folder's architecture, weights and tokenizer."""
  if not os.path.isfile(os.path.join(folder, 'config.json')):
    raise UserError(f'config.serve.folder={folder}: not a Hugging Face folder (no config.json)')
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.init_from, config.tokenizer = folder, ''
    config.model.llm_from = config.model.vision_from = ''
    config.lora.rank = 0
  return config


def serve(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Serves the latest checkpoint (or `config.serve.folder`) as an OpenAI-compatible API
  until interrupted."""
  import uvicorn  # pylint: disable=g-import-not-at-top

  from openvlm_jax.serving import api  # pylint: disable=g-import-not-at-top
  engine, name = serving_engine(config, workdir)
  start = time.perf_counter()
  num_shapes = engine.warm_up(config.serve.temperature)
  say(f'compiled the decoder for {num_shapes} request shapes in '
      f'{time.perf_counter() - start:.0f} s')
  app = api.make_app(engine, name, default_temperature=config.serve.temperature)
  say(f'serving {name} on http://{config.serve.host}:{config.serve.port}/v1 '
      '(OpenAI chat completions; Ctrl-C stops)')
  uvicorn.run(app, host=config.serve.host, port=config.serve.port, log_level='warning')
  return dict(model=name, **engine.stats)


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
  """One closing line for the console: 'held-out exact match: 0.9593 (270 examples), ...'."""
  if mode in ('train', 'eval') and 'num_examples' in result:
    headline, _, rest = loop.format_metrics(result).partition(' (')
    name, _, value = headline.rpartition(' ')
    return f'held-out {name}: {value} ({rest}'
  return json.dumps(result)
