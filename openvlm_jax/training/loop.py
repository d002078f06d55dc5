"""The training loop, top to bottom: data, model, restore or init, compile, then step."""

import json
import numbers
import signal
import time

import jax
import ml_collections
import tqdm
from absl import logging

from openvlm_jax import checkpoint, config_lib, objectives, parallel
from openvlm_jax import workdir as workdir_lib
from openvlm_jax.console import UserError, say
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import setup
from openvlm_jax.training import state as state_lib
from openvlm_jax.training import step as step_lib
from openvlm_jax.training.logger import MetricLogger


class PreemptionFlag:
  """Set by the first SIGTERM: the loop then saves a checkpoint and stops cleanly.

  A second SIGTERM (e.g. while a save hangs) ends the process at once.
  """

  def __init__(self):
    self.raised = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.raised:
      raise SystemExit(128 + signum)
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    say('SIGTERM received: saving a checkpoint and stopping.')
    self.raised = True

  def restore(self) -> None:
    """Puts the previous SIGTERM handler back."""
    signal.signal(signal.SIGTERM, self._previous)


def is_due(step: int, every: int, last_step: int) -> bool:
  """Whether an action run every `every` steps (0: never) happens at `step`."""
  return every > 0 and (step % every == 0 or step == last_step)


def check_finite(step: int, metrics: dict, manager) -> None:
  """Stops the run if step `step` produced a non-finite loss or gradient norm.

  Nothing of that step is saved, so the newest checkpoint on disk is the last good one.
  """
  if bool(jax.device_get(metrics['finite'])):
    return
  values = {name: float(jax.device_get(metrics[name])) for name in ('loss', 'grad_norm')}
  good = manager.latest_step()
  kept = f'the last good checkpoint is step {good}' if good is not None else 'no checkpoint'
  raise UserError(f"step {step}: non-finite loss or gradient norm (loss {values['loss']:.4g}, "
                  f"grad norm {values['grad_norm']:.4g}); stopped without saving ({kept}). "
                  'Lower --config.optimizer.lr or raise warmup_steps, then rerun to resume.')


def check_resume_config(manager, step: int, config: ml_collections.ConfigDict) -> None:
  """Prints how the config differs from the checkpoint's; refuses changes of state shapes."""
  saved = checkpoint.saved_config(manager, step)
  if saved is None:
    return
  changes = config_lib.config_changes(saved, config)
  if not changes:
    return
  lines = [f'  {key}: {json.dumps(old, default=str)} -> {json.dumps(new, default=str)}'
           for key, old, new in changes]
  refused = [key for key, _, _ in changes if config_lib.changes_state_shapes(key)]
  if refused:
    shown = '; '.join(line.strip() for line, (key, _, _) in zip(lines, changes) if key in refused)
    raise UserError(f'resuming step {step} of {manager.directory} with {shown} would not fit the '
                    'saved state; undo the change or use a new --workdir')
  say(f'Resuming step {step} with a changed config:\n' + '\n'.join(lines))


def check_reference_seed(manager, step: int, config: ml_collections.ConfigDict,
                         reference) -> None:
  """A frozen reference copy is rebuilt on resume from the seed (or `init_from`); a changed
  seed would make it another model than the one the run started from."""
  saved = checkpoint.saved_config(manager, step)
  if reference is None or saved is None or saved.get('seed', config.seed) == config.seed:
    return
  raise UserError(f"resuming step {step} with config.seed={config.seed} (saved: {saved['seed']}) "
                  'would rebuild the objective\'s reference as another model; keep the seed')


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`. Returns the final eval metrics."""
  training = config.training
  parallel.initialize_distributed()  # before anything asks JAX about processes
  lock = workdir_lib.WorkdirLock(workdir)
  if jax.process_index() == 0:
    lock.acquire()
    workdir_lib.check_writable(workdir)
    workdir_lib.check_writable(checkpoint.checkpoint_dir(workdir))
  try:
    return _train(config, workdir, training)
  finally:
    lock.release()


def _train(config: ml_collections.ConfigDict, workdir: str,
           training: ml_collections.ConfigDict) -> dict:
  # ---- Data, tokenizer and model -------------------------------------------------------------
  run = setup.make_run(config, workdir)
  if jax.process_index() == 0:
    say(f'Config written to {workdir_lib.write_config(workdir, config)}')
  objective = objectives.get(config.objective, run.tokenizer)
  layout = setup.state_layout(run)
  setup.check_objective_fits(run, objective)
  trainable, optimizer, shardings = layout.trainable, layout.optimizer, layout.shardings
  reference = setup.reference_params(run, objective, layout)  # None: adapters off, or unread
  # Eval data is validated now, before any training, under the same bad-record policy.
  evaluator = None
  if run.has_eval:
    evaluator = setup.make_evaluator(
        run, setup.load_eval_set(run, pairs=objective.pairs), objective, shardings.params,
        reference=reference if objectives.for_evaluation(objective).reference else None)
  train_iterator = setup.train_iterator(run, pairs=objective.pairs)
  rollouts = setup.make_rollout_maker(run, objective)  # GRPO: batches sampled each step

  # ---- Restore or initialise -----------------------------------------------------------------
  saved = checkpoint.saved_steps(workdir)
  manager = checkpoint.make_manager(workdir, training.keep_checkpoints, protect=saved[-1:])
  latest_step = manager.latest_step()
  if latest_step is not None:
    check_resume_config(manager, latest_step, config)
    check_reference_seed(manager, latest_step, config, reference)
    state = checkpoint.restore(manager, latest_step, layout.abstract_state(run.model),
                               train_iterator)
    say(f'Resumed from {manager.directory} at step {latest_step}')
  else:
    params = setup.pretrained_params(run, shardings.params)
    state = state_lib.create_train_state(run.model, optimizer, layout.example_inputs, shardings,
                                         jax.random.key(config.seed), params=params)
  num_trained, num_params = optimizer_lib.count_trainable(state.params, trainable(state.params))
  say(f'Model: {num_params / 1e6:.2f}M parameters, {num_trained / 1e6:.2f}M trained '
      f'({100 * num_trained / max(num_params, 1):.1f}%)')

  # ---- Compile -------------------------------------------------------------------------------
  train_step = jax.jit(
      step_lib.make_train_step(run.model, objective, optimizer, layout.schedule,
                               config.optimizer.grad_accum_steps, trainable=trainable,
                               num_updates=objectives.updates_per_step(config.objective)),
      in_shardings=(shardings, parallel.batch_sharding(run.mesh),
                    None if reference is None else shardings.params),
      out_shardings=(shardings, None), donate_argnums=0)
  # Traced under the mesh and rules, so the models' activation constraints take effect.
  train_step = parallel.under_mesh(train_step, run.mesh, config.logical_axis_rules)

  # ---- Loop ----------------------------------------------------------------------------------
  logger = MetricLogger(workdir)
  preemption = PreemptionFlag()
  start_step = int(jax.device_get(state.step))
  progress = tqdm.tqdm(total=training.num_steps, initial=start_step, unit='step', dynamic_ncols=True,
                       disable=not training.progress_bar or jax.process_index() != 0)
  window_tokens, window_steps, window_start, window_rollouts = 0, 0, time.perf_counter(), {}
  eval_metrics, eval_step_done, unchecked = {}, None, None
  try:
    for step in range(start_step + 1, training.num_steps + 1):
      local_batch = next(train_iterator)
      if rollouts is not None:  # prompts -> sampled, rewarded answers of the current params
        local_batch, rollout_stats = rollouts(state.params, local_batch, step)
        for name, value in rollout_stats.items():
          window_rollouts[name] = window_rollouts.get(name, 0.0) + value
      # Real tokens: attention_mask holds segment ids (1, 2, ... in a packed row, 0 at pads).
      window_tokens += int((local_batch['attention_mask'] > 0).sum()) * jax.process_count()
      window_steps += 1
      state, metrics = train_step(state, parallel.global_batch(local_batch, run.mesh),
                                  reference)
      # The previous step is done by now; checking it does not stall the one just started.
      if unchecked is not None:
        check_finite(*unchecked, manager)
      unchecked = (step, metrics)
      checkpoint.raise_failed_save(manager)  # a failed background save surfaces at once
      progress.update(1)

      if step % training.log_every == 0 or step == training.num_steps:
        check_finite(step, metrics, manager)
        scalars = {name: float(value) for name, value in jax.device_get(metrics).items()
                   if name != 'finite'}
        elapsed = time.perf_counter() - window_start
        scalars['tokens_per_second'] = window_tokens / elapsed
        scalars['seconds_per_step'] = elapsed / window_steps
        scalars.update({name: total / window_steps for name, total in window_rollouts.items()})
        window_tokens, window_steps, window_start, window_rollouts = (
            0, 0, time.perf_counter(), {})
        logger.write(step, 'train', scalars)
        progress.set_postfix(loss=f"{scalars['loss']:.4f}",
                             tok_s=f"{scalars['tokens_per_second']:.0f}")
        progress.write(format_train(step, scalars, objective.shown))

      # A checkpoint is saved before the eval of the same step, so an eval failure loses nothing.
      if is_due(step, training.checkpoint_every, training.num_steps) or preemption.raised:
        check_finite(step, metrics, manager)
        checkpoint.save(manager, step, state, train_iterator, config, force=preemption.raised)
      if preemption.raised:
        break

      if evaluator is not None and is_due(step, training.eval_every, training.num_steps):
        check_finite(step, metrics, manager)
        eval_metrics, eval_step_done = evaluate(evaluator, state.params, training), step
        logger.write(step, 'eval', eval_metrics)
        progress.write(format_eval(step, eval_metrics))
    if unchecked is not None:
      check_finite(*unchecked, manager)
    checkpoint.raise_failed_save(manager, wait=True)
  finally:
    progress.close()
    preemption.restore()
    logger.close()
    setup.close(run, train_iterator)
    try:
      manager.close()  # waits for the saves still running
    except Exception:  # noqa: BLE001  (an error is already on its way up)
      logging.info('closing the checkpoint manager failed', exc_info=True)
  if (evaluator is not None and not preemption.raised
      and eval_step_done != int(jax.device_get(state.step))):
    eval_metrics = evaluator.teacher_forced(state.params)
  return eval_metrics


def evaluate(evaluator, params, training: ml_collections.ConfigDict) -> dict:
  """Teacher-forced metrics, plus generated-answer scores when `training.eval_generate`."""
  metrics = evaluator.teacher_forced(params)
  if training.eval_generate:
    metrics.update(evaluator.generated(params))
  return metrics


def format_train(step: int, scalars: dict, shown: tuple[str, ...]) -> str:
  """The console line of one logged training step: loss, the objective's `shown`, speed."""
  extra = ''.join(f'  {name} {scalars[name]:.4f}' for name in shown)
  return (f"step {step:6d}  loss {scalars['loss']:.6f}{extra}  grad_norm "
          f"{scalars['grad_norm']:.4f}  lr {scalars['learning_rate']:.3e}  "
          f"tokens/s {scalars['tokens_per_second']:.0f}")


def format_metrics(metrics: dict) -> str:
  """'exact match 0.9593 (270 examples), token accuracy 0.9852, ...; generated: ...'.

  The objective's metrics in its order (the first, its headline, with the example count),
  then the generated-answer scores.
  """
  scalars = {name: value for name, value in metrics.items() if isinstance(value, numbers.Number)}
  taught = [(name, value) for name, value in scalars.items()
            if not name.startswith('generated_') and name not in ('num_examples', 'step')]
  generated = [(name[len('generated_'):], value) for name, value in scalars.items()
               if name.startswith('generated_') and name != 'generated_num_examples']
  parts = [f"{name.replace('_', ' ')} {value:.4f}" for name, value in taught]
  if parts and 'num_examples' in metrics:
    parts[0] += f" ({metrics['num_examples']:.0f} examples)"
  line = ', '.join(parts)
  if generated:
    line += '; generated: ' + ', '.join(f"{name.replace('_', ' ')} {value:.4f}"
                                        for name, value in generated)
  return line


def format_eval(step: int, metrics: dict) -> str:
  """The console line of one evaluation."""
  return f'step {step:6d}  eval {format_metrics(metrics)}'

