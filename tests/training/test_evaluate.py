"""The evaluation room's pieces: one eval set, its questions and types, per-type scores."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from openvlm_jax.console import UserError
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.training import evaluate


@pytest.fixture(scope='module')
def spec(tmp_path_factory):
  texts = ['user:\nWhat is the rainfall for Mar, in mm?', 'assistant:\n12.5', 'Which month?'] * 20
  tokenizer = tokenizer_lib.train_tokenizer(texts, str(tmp_path_factory.mktemp('tok')),
                                            vocab_size=300)
  return examples_lib.ExampleSpec(tokenizer=tokenizer, image_size=8, image_mean=(0.5,) * 3,
                                  image_std=(0.5,) * 3, num_image_tokens=2, seq_len=64,
                                  max_images=1)


def _write(tmp_path, rows):
  os.makedirs(tmp_path / 'images', exist_ok=True)
  for i, _ in enumerate(rows):
    Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp_path / f'images/{i}.png')
  path = tmp_path / 'eval.jsonl'
  path.write_text(''.join(json.dumps(dict(row, image=f'images/{i}.png')) + '\n'
                          for i, row in enumerate(rows)))
  return str(path)


ROWS = [
    {'question': '<image>\nWhat is the rainfall for Mar, in mm?', 'answer': '12.5',
     'question_type': 'value'},
    {'question': '<image>\nWhat is the highest value shown?', 'answer': '30',
     'question_type': 'max'},
    {'question': '<image>\nWhich month has the highest value?', 'answer': 'Jul',
     'question_type': 'argmax'},
    {'question': '<image>\nWhat is the rainfall for Apr, in mm?', 'answer': '8',
     'question_type': 'value'},
]


def test_scores_by_question_type_use_the_questions_units(spec, tmp_path):
  eval_set = evaluate.load_eval_set([_write(tmp_path, ROWS)], spec, on_bad_record='skip',
                                    check=examples_lib.check_question)
  assert eval_set.questions[0] == ROWS[0]['question']
  answers = [{'answer': a} for a in ('12.5 mm.', '31', 'jul', '9')]
  scores = evaluate.score(answers, eval_set, prefix='')
  assert scores['exact_match'] == 0.0  # raw: '12.5 mm.', '31', 'jul' and '9' all differ
  assert scores['normalized_exact_match'] == 0.5  # the unit, the dot and the case go
  by_type = evaluate.score_by_type(answers, eval_set)
  assert sorted(by_type) == ['argmax', 'max', 'value']
  assert by_type['value']['num_examples'] == 2 and by_type['value']['relaxed_accuracy'] == 0.5
  assert by_type['max']['relaxed_accuracy'] == 1.0  # 31 is within 5% of 30
  assert by_type['max']['mean_relative_error'] == pytest.approx(1 / 30)
  assert 'mean_relative_error' not in by_type['argmax']
  table = evaluate.format_by_type(by_type)
  assert table.splitlines()[0].split()[:2] == ['question', 'type']
  assert len(table.splitlines()) == 4


def test_an_image_gone_after_validation_is_named_not_a_traceback(spec, tmp_path):
  eval_set = evaluate.load_eval_set([_write(tmp_path, ROWS)], spec, on_bad_record='skip',
                                    check=examples_lib.check_question)
  evaluator = evaluate.Evaluator.__new__(evaluate.Evaluator)  # only its image reader is used
  evaluator.eval_set = eval_set
  assert evaluator._images_of(1)['images'].shape == (1, 8, 8, 3)
  os.remove(tmp_path / 'images' / '1.png')
  with pytest.raises(UserError, match=r'eval\.jsonl:2: image not found: .*1\.png'):
    evaluator._images_of(1)
