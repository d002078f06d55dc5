"""The training loop, top to bottom: data, model, restore or init, compile, then step."""

import os
import signal
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from openvlm_jax import checkpoint
from openvlm_jax import evaluation
from openvlm_jax import inference
from openvlm_jax import objectives
from openvlm_jax import parallel
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import setup
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib
from openvlm_jax.training.logger import MetricLogger


class PreemptionFlag:
  """Set by SIGTERM; the loop then saves a checkpoint and stops cleanly."""

  def __init__(self):
    self.raised = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.raised = True


def evaluate(eval_step, params, run: setup.Run) -> dict:
  """Runs `eval_step` over the whole eval split once. Returns host floats."""
  totals = {}
  for local_batch in setup.eval_batches(run):
    sums = eval_step(params, parallel.global_batch(local_batch, run.mesh))
    for name, value in jax.device_get(sums).items():
      totals[name] = totals.get(name, 0.0) + float(value)
  num_tokens = max(totals.get('num_tokens', 0.0), 1.0)
  return dict(
      loss=totals['loss_sum'] / num_tokens,
      perplexity=float(np.exp(totals['nll_sum'] / num_tokens)),
      token_accuracy=totals['correct_tokens'] / num_tokens,
      exact_match=totals['exact_match'] / max(totals['num_examples'], 1.0),
      num_examples=totals['num_examples'],
  )


def answer(run: setup.Run, params, questions: list[dict]) -> list[dict]:
  """Generated answers to `questions` (see `inference.read_questions`), by config.predict."""
  return inference.answer_questions(
      run.model, params, run.tokenizer, questions,
      sampling=inference.sampling_from_config(run.config.predict, run.tokenizer),
      batch_size=run.config.predict.batch_size, max_images=run.config.data.max_images,
      seed=run.config.seed)


def evaluate_generated(params, run: setup.Run) -> dict:
  """Decodes an answer to every eval question and scores it as a user would.

  Exact match, numeric exact match and relaxed accuracy (ChartQA's 5% rule) of the generated
  text, next to the teacher-forced metrics of `evaluate`.
  """
  questions = [q for path in run.eval_files for q in inference.read_questions(path)]
  answers = answer(run, params, questions)
  scores = evaluation.score_answers([a['answer'] for a in answers],
                                    [q['answer'] or '' for q in questions])
  return {f'generated_{name}': scores[name]
          for name in ('exact_match', 'numeric_exact_match', 'relaxed_accuracy')}


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`. Returns the final eval metrics."""
  os.makedirs(workdir, exist_ok=True)
  training = config.training

  # ---- Data, tokenizer and model -------------------------------------------------------------
  run = setup.make_run(config, workdir)
  train_iterator = setup.train_iterator(run)
  loss_terms = objectives.get(config.objective, run.tokenizer)
  layout = setup.state_layout(run)
  trainable, optimizer, shardings = layout.trainable, layout.optimizer, layout.shardings

  # ---- Restore or initialise -----------------------------------------------------------------
  manager = checkpoint.make_manager(workdir, training.keep_checkpoints)
  latest_step = manager.latest_step()
  if latest_step is not None:
    state = checkpoint.restore(manager, latest_step, layout.abstract_state(run.model),
                               train_iterator)
    logging.info('Resumed from %s at step %d', manager.directory, latest_step)
  else:
    params = setup.pretrained_params(run, shardings.params)
    state = state_lib.create_train_state(run.model, optimizer, layout.example_inputs, shardings,
                                         jax.random.key(config.seed), params=params)
  num_trained, num_params = optimizer_lib.count_trainable(state.params, trainable(state.params))
  logging.info('Model: %.2fM parameters, %.2fM trained (%.1f%%)', num_params / 1e6,
               num_trained / 1e6, 100 * num_trained / max(num_params, 1))

  # ---- Compile -------------------------------------------------------------------------------
  batch_sharding = parallel.batch_sharding(run.mesh)
  train_step = jax.jit(
      step_lib.make_train_step(run.model, loss_terms, optimizer, layout.schedule,
                               config.optimizer.grad_accum_steps, trainable=trainable),
      in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
      donate_argnums=0)
  eval_step = jax.jit(step_lib.make_eval_step(run.model, loss_terms),
                      in_shardings=(shardings.params, batch_sharding))
  # Traced under the mesh and rules, so the models' activation constraints take effect.
  train_step = parallel.under_mesh(train_step, run.mesh, config.logical_axis_rules)
  eval_step = parallel.under_mesh(eval_step, run.mesh, config.logical_axis_rules)

  # ---- Loop ----------------------------------------------------------------------------------
  logger = MetricLogger(workdir)
  preemption = PreemptionFlag()
  start_step = int(jax.device_get(state.step))
  progress = tqdm.tqdm(total=training.num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not training.progress_bar or jax.process_index() != 0)
  window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
  eval_metrics, eval_step_done = {}, None
  for step in range(start_step + 1, training.num_steps + 1):
    local_batch = next(train_iterator)
    window_tokens += int(local_batch['attention_mask'].sum()) * jax.process_count()
    window_steps += 1
    state, metrics = train_step(state, parallel.global_batch(local_batch, run.mesh))
    progress.update(1)

    if step % training.log_every == 0 or step == training.num_steps:
      scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - window_start
      scalars['tokens_per_second'] = window_tokens / elapsed
      scalars['seconds_per_step'] = elapsed / window_steps
      window_tokens, window_steps, window_start = 0, 0, time.perf_counter()
      logger.write(step, 'train', scalars)
      progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                           tok_s=f"{scalars['tokens_per_second']:.0f}")
      progress.write(f"step {step:6d}  loss {scalars['loss']:.6f}  "
                     f"grad_norm {scalars['grad_norm']:.4f}  lr {scalars['learning_rate']:.3e}  "
                     f"tokens/s {scalars['tokens_per_second']:.0f}")

    if run.has_eval and (step % training.eval_every == 0 or step == training.num_steps):
      eval_metrics, eval_step_done = evaluate(eval_step, state.params, run), step
      if training.eval_generate:
        eval_metrics.update(evaluate_generated(state.params, run))
      logger.write(step, 'eval', eval_metrics)
      generated = (f"  generated: exact match {eval_metrics['generated_exact_match']:.4f}, "
                   f"relaxed accuracy {eval_metrics['generated_relaxed_accuracy']:.4f}"
                   if training.eval_generate else '')
      progress.write(f"step {step:6d}  eval loss {eval_metrics['loss']:.4f}  "
                     f"token accuracy {eval_metrics['token_accuracy']:.4f}  "
                     f"exact match {eval_metrics['exact_match']:.4f} "
                     f"({eval_metrics['num_examples']:.0f} examples){generated}")

    if step % training.checkpoint_every == 0 or step == training.num_steps or preemption.raised:
      checkpoint.save(manager, step, state, train_iterator, config, force=preemption.raised)
    if preemption.raised:
      break

  progress.close()
  manager.wait_until_finished()
  manager.close()
  logger.close()
  setup.close(run, train_iterator)
  if (run.has_eval and not preemption.raised
      and eval_step_done != int(jax.device_get(state.step))):
    eval_metrics = evaluate(eval_step, state.params, run)
  if eval_metrics:
    logging.info('Final held-out exact match: %.4f over %d examples',
                 eval_metrics['exact_match'], eval_metrics['num_examples'])
  return eval_metrics

