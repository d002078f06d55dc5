"""Predictions into a SQLite database (through sqlite-utils) that `datasette runs.db` browses.

Tables, one row per:
  runs         a prediction run: id, created_at, mode, workdir, checkpoint_step, input_file,
               config (the run's full config as JSON)
  examples     a question of a run: id ("<run>/<example>"), run_id, example_id, question,
               image_paths (JSON list), reference (the expected answer, or null)
  predictions  an answer: id (= the example's id), run_id, example_id, answer, num_tokens,
               exact_match (raw), numeric_exact_match, relaxed_match (normalised; null
               without a reference)
  metrics      a run's aggregate: run_id, name, value
`predictions.answer` and `examples.question` have full-text search (FTS5, kept current by
triggers), so Datasette shows a search box on them. Several runs share one database.
"""

import datetime
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import sqlite_utils

from openvlm_jax import evaluation


def _match(metric, answer: str, reference: str | None) -> int | None:
  return None if reference is None else int(metric(answer, reference))


def export_predictions(
    db_path: str,
    *,
    questions: Sequence[Mapping[str, Any]],
    answers: Sequence[Mapping[str, Any]],
    config: Mapping[str, Any],
    metrics: Mapping[str, float],
    workdir: str = '',
    checkpoint_step: int | None = None,
    input_file: str = '',
    mode: str = 'predict',
    run_id: str | None = None,
) -> str:
  """Writes one run's questions, answers and metrics into `db_path` (created if missing).

  Args:
    db_path: the SQLite file.
    questions: `{"id", "image_paths", "question", "answer" (reference or None)}` each, as
      `modes.question_row` writes them.
    answers: `{"answer", "num_tokens"}` each, in the order of `questions`.
    config: the run's config as plain data (e.g. `config.to_dict()`), stored as JSON.
    metrics: aggregate metrics of the run (name -> number).
    workdir, checkpoint_step, input_file, mode: recorded in the `runs` row.
    run_id: the run's id; a fresh one (time + random suffix) when None.

  Returns:
    The run id.
  """
  if len(questions) != len(answers):
    raise ValueError(f'{len(answers)} answers for {len(questions)} questions')
  now = datetime.datetime.now(datetime.UTC)
  run_id = run_id or f"{now.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
  db = sqlite_utils.Database(db_path)
  db['runs'].insert({
      'id': run_id, 'created_at': now.isoformat(timespec='seconds'), 'mode': mode,
      'workdir': workdir, 'checkpoint_step': checkpoint_step, 'input_file': input_file,
      'config': json.dumps(config, sort_keys=True, default=str),
  }, pk='id', replace=True)
  examples, predictions = [], []
  for question, answer in zip(questions, answers):
    row_id, reference, text = f"{run_id}/{question['id']}", question.get('answer'), answer['answer']
    examples.append({
        'id': row_id, 'run_id': run_id, 'example_id': str(question['id']),
        'question': question['question'], 'image_paths': json.dumps(list(question['image_paths'])),
        'reference': reference,
    })
    predictions.append({
        'id': row_id, 'run_id': run_id, 'example_id': str(question['id']), 'answer': text,
        'num_tokens': int(answer.get('num_tokens', 0)),
        'exact_match': _match(evaluation.exact_match, text, reference),
        'numeric_exact_match': _match(evaluation.numeric_exact_match, text, reference),
        'relaxed_match': _match(
            lambda a, r: evaluation.relaxed_match(a, r, question=question['question']),
            text, reference),
    })
  # Typed up front: the first rows may hold only nulls in these columns.
  match_columns = dict.fromkeys(('exact_match', 'numeric_exact_match', 'relaxed_match'), int)
  db['examples'].insert_all(examples, pk='id', foreign_keys=[('run_id', 'runs', 'id')],
                            columns={'reference': str}, alter=True, replace=True)
  db['predictions'].insert_all(
      predictions, pk='id', columns=match_columns, alter=True, replace=True,
      foreign_keys=[('run_id', 'runs', 'id'), ('id', 'examples', 'id')])
  db['metrics'].insert_all(
      [{'run_id': run_id, 'name': name, 'value': float(value)} for name, value in metrics.items()],
      pk=('run_id', 'name'), foreign_keys=[('run_id', 'runs', 'id')], replace=True)
  for table, column in (('predictions', 'answer'), ('examples', 'question')):
    if not db[table].detect_fts():
      db[table].enable_fts([column], create_triggers=True)
  db.close()
  return run_id
