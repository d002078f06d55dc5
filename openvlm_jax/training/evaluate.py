"""One evaluation room: teacher-forced metrics and generated answers over the same examples.

The records are read and validated once, through the data pipeline and under
`config.data.on_bad_record` (`load_eval_set`). Teacher-forced eval and generated eval both
read that one set, so they cover the same examples and report the same `num_examples`. A
generated answer is the answer to a record's last assistant turn, prompted with every turn
before it; teacher-forced exact match asks every assistant token of the record to be the
argmax. The jitted eval step and generate function are built once per run, under the mesh
(one generate shape: `predict.batch_size` rows, prompts padded to the set's longest).
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from openvlm_jax import evaluation, inference, parallel
from openvlm_jax.console import UserError
from openvlm_jax.data import conversation, pipeline
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.objectives import Objective
from openvlm_jax.training import step as step_lib


@dataclasses.dataclass
class EvalSet:
  """Validated records with the prompt and reference answer of each."""

  records: pipeline.SubsetSource  # the records that passed validation, in file order
  spec: examples_lib.ExampleSpec
  prompts: list[np.ndarray]  # token ids [prompt_len_i] of each record's last question
  references: list[str | None]  # its answer, None for a question without one
  questions: list[str]  # the text of that last question (it may name the answer's unit)
  question_types: list[str | None]  # the records' `question_type`, for per-type scores
  label_answers: list[bool]  # answers that are names (`answer_kind` 'label'): exact only
  bad_records: pipeline.BadRecords
  on_bad_record: str  # the policy it was read under, also for a record failing later

  def __len__(self) -> int:
    return len(self.records)

  def record(self, index: int) -> dict[str, Any]:
    """Record `index` as `jsonl.parse_record` returns it."""
    return self.records[index]


def load_eval_set(files: Sequence[str] | Any, spec: examples_lib.ExampleSpec, *,
                  on_bad_record: str,
                  check: Callable[..., None] = examples_lib.check_record) -> EvalSet:
  """Reads and validates every record of `files` once (every process reads all of them).

  `check` is `examples.check_record` for eval files (the whole conversation must fit, as in
  training) or `examples.check_question` for questions to answer.
  """
  bad_records = pipeline.BadRecords()
  records = pipeline.load_records(files, spec, on_bad_record=on_bad_record,
                                  bad_records=bad_records, check=check)
  prompts, references, questions, types, labels = [], [], [], [], []
  for index in range(len(records)):
    record = records[index]
    prompt, reference = examples_lib.encode_prompt(record, spec)
    prompts.append(prompt)
    references.append(reference)
    questions.append(last_question(record))
    types.append(record.get('question_type'))
    labels.append(record.get('answer_kind') == 'label')
  return EvalSet(records=records, spec=spec, prompts=prompts, references=references,
                 questions=questions, question_types=types, label_answers=labels,
                 bad_records=bad_records, on_bad_record=on_bad_record)


def last_question(record: dict[str, Any]) -> str:
  """The text of a record's last user turn ('' if it has none)."""
  return next((str(turn.get('value', '')) for turn in reversed(record['conversations'])
               if conversation.ROLES.get(turn.get('from')) == 'user'), '')


class Evaluator:
  """Teacher-forced and generated metrics of parameters over one `EvalSet`.

  Built once per run: its eval step and generate function compile on first use and are
  reused by every later evaluation.
  """

  def __init__(self, *, model: Any, objective: Objective, eval_set: EvalSet, mesh: Any,
               rules: Sequence[tuple], param_shardings: Any, local_batch_size: int,
               sampling: inference.SamplingConfig, generate_batch_size: int, seed: int = 0,
               reference_params: Any = None):
    self.eval_set = eval_set
    self.mesh = mesh
    self.local_batch_size = local_batch_size
    self.generate_batch_size = generate_batch_size
    self.seed = seed
    self.tokenizer = eval_set.spec.tokenizer
    self.objective = objective
    shardings = (param_shardings, parallel.batch_sharding(mesh))
    if reference_params is None:
      eval_step = jax.jit(step_lib.make_eval_step(model, objective), in_shardings=shardings)
    else:  # the objective's reference is a frozen copy of the starting params
      with_reference = jax.jit(step_lib.make_eval_step(model, objective),
                               in_shardings=shardings + (param_shardings,))
      eval_step = lambda params, batch: with_reference(params, batch, reference_params)
    self._run_eval_step = parallel.under_mesh(eval_step, mesh, rules)
    self._run_generate = parallel.under_mesh(inference.make_generate_fn(model, sampling), mesh,
                                             rules)

  def teacher_forced(self, params: Any) -> dict[str, float]:
    """The objective's metrics under teacher forcing, and `loss`, over the whole set."""
    process, num_processes = jax.process_index(), jax.process_count()
    indices = range(process, len(self.eval_set), num_processes)  # this process's rows
    rows_per_process = math.ceil(len(self.eval_set) / num_processes)
    num_batches = math.ceil(rows_per_process / self.local_batch_size)
    totals = {}
    for local_batch in pipeline.batches_of(self.eval_set.records, indices, self.eval_set.spec,
                                           self.local_batch_size, num_batches=num_batches,
                                           on_bad_record=self.eval_set.on_bad_record,
                                           pairs=self.objective.pairs):
      sums = self._run_eval_step(params, parallel.global_batch(local_batch, self.mesh))
      for name, value in jax.device_get(sums).items():
        totals[name] = totals.get(name, 0.0) + float(value)
    objective = self.objective
    metrics = {name: float(jax.device_get(value))  # in the objective's order
               for name, value in objective.metrics(totals).items()}
    metrics['loss'] = float(objective.loss_of(totals))
    return metrics

  def answers(self, params: Any) -> list[dict[str, Any]]:
    """A generated `{"answer", "num_tokens"}` for every record, in order."""
    if not len(self.eval_set):
      return []
    return inference.answer_prompts(
        self._run_generate, params, self.tokenizer, self.eval_set.prompts,
        self._images_of,
        batch_size=self.generate_batch_size,
        prompt_len=max(len(prompt) for prompt in self.eval_set.prompts), seed=self.seed)

  def _images_of(self, index: int) -> dict[str, np.ndarray]:
    """The image inputs of record `index` (`examples.image_inputs`), or a one-line error
    naming it (they changed on disk after validation, so the two evals could no longer
    cover the same examples)."""
    record = self.eval_set.record(index)
    try:
      return examples_lib.image_inputs(record, self.eval_set.spec, self.eval_set.prompts[index])
    except ValueError as error:
      raise UserError(f"{record.get('where', '?')}: {error} (it was readable when the eval "
                      'set was validated)') from error

  def generated(self, params: Any) -> dict[str, float]:
    """Raw and normalised scores of generated answers (`evaluation.score_answers`)."""
    return score(self.answers(params), self.eval_set)


def score(answers: Sequence[dict[str, Any]], eval_set: EvalSet, prefix: str = 'generated_',
          question_type: str | None = None) -> dict:
  """Scores of the answers that have a reference, and how many were scored (`num_examples`).

  Names carry `prefix`, so they sit beside the teacher-forced metrics of the same eval. With
  `question_type`, only the records of that type count.
  """
  rows = [(answer['answer'], reference, question, label)
          for answer, reference, question, label, kind
          in zip(answers, eval_set.references, eval_set.questions, eval_set.label_answers,
                 eval_set.question_types)
          if reference is not None and question_type in (None, kind)]
  if not rows:
    return {}
  scores = evaluation.score_answers(*zip(*rows))
  return {f'{prefix}{name}': value for name, value in scores.items()}


def score_by_type(answers: Sequence[dict[str, Any]], eval_set: EvalSet) -> dict[str, dict]:
  """{question_type: scores} for the types that have scored records ({} if none)."""
  by_type = {kind: score(answers, eval_set, prefix='', question_type=kind)
             for kind in sorted(set(eval_set.question_types) - {None})}
  return {kind: scores for kind, scores in by_type.items() if scores}


def format_by_type(scores: dict[str, dict]) -> str:
  """A table of per-type scores: type, examples, relaxed accuracy, exact match, MRE."""
  header = (f"{'question type':<14} {'examples':>8} {'relaxed':>8} {'exact':>8} "
            f"{'norm. exact':>11} {'mean rel. err':>13}")
  lines = [header]
  for kind, row in scores.items():
    error = row.get('mean_relative_error')
    lines.append(f"{kind:<14} {row['num_examples']:>8.0f} {row['relaxed_accuracy']:>8.4f} "
                 f"{row['exact_match']:>8.4f} {row['normalized_exact_match']:>11.4f} "
                 f"{'-' if error is None else f'{error:.4f}':>13}")
  return '\n'.join(lines)
