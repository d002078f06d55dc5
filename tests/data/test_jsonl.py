"""Tests of LLaVA JSONL parsing, safe image paths and the random-access source."""

import json
import os

import pytest

from openvlm_jax.data import jsonl


def test_parse_record_resolves_paths_relative_to_the_file(tmp_path, make_record):
  path = str(tmp_path / 'data.jsonl')
  record = dict(make_record(3), image=['images/3.png', 'images/4.png'])
  parsed = jsonl.parse_record(json.dumps(record), path, 7)
  assert parsed['where'] == f'{path}:7'
  assert parsed['id'] == 'r3'
  assert parsed['image_paths'] == [str(tmp_path / 'images/3.png'), str(tmp_path / 'images/4.png')]
  no_image = jsonl.parse_record(json.dumps({'conversations': []}), path, 1)
  assert no_image['image_paths'] == [] and no_image['id'] == 'data.jsonl:1'  # line, not offset


def test_question_records_read_as_one_turn_conversations(tmp_path):
  path = str(tmp_path / 'q.jsonl')
  question = jsonl.parse_record(json.dumps({'question': 'How much?', 'answer': 4}), path, 3)
  assert question['id'] == 'q.jsonl:3'
  assert question['conversations'] == [{'from': 'human', 'value': 'How much?'},
                                       {'from': 'gpt', 'value': '4'}]
  unanswered = jsonl.parse_record(json.dumps({'id': 'a', 'question': 'Why?'}), path, 4)
  assert unanswered['conversations'] == [{'from': 'human', 'value': 'Why?'}]
  with pytest.raises(ValueError, match=f"^{path}:5: 'question' must be a string"):
    jsonl.parse_record(json.dumps({'question': 5}), path, 5)


@pytest.mark.parametrize('line, reason', [
    ('{"conversations": [', 'malformed JSON'),
    ('[1, 2]', 'must be a JSON object'),
    ('{"id": 1}', "'conversations' is missing"),
    ('{"conversations": "hi"}', "'conversations' must be a list"),
    ('{"conversations": [], "image": 3}', "'image' must be a path"),
    ('{"conversations": [], "image": "../secret.png"}', 'escapes the dataset folder'),
    ('{"conversations": [], "image": "images/../../x.png"}', 'escapes the dataset folder'),
    ('{"conversations": [], "image": "/etc/passwd"}', 'escapes the dataset folder'),
])
def test_bad_lines_name_file_and_line(tmp_path, line, reason):
  path = str(tmp_path / 'data.jsonl')
  with pytest.raises(ValueError, match=f'^{path}:12: .*{reason}'):
    jsonl.parse_record(line, path, 12)


def test_absolute_path_inside_the_root_is_allowed(tmp_path):
  inside = str(tmp_path / 'images' / 'a.png')
  assert jsonl.resolve_image_path(str(tmp_path), inside) == inside


def test_symlink_out_of_the_root_is_rejected(tmp_path):
  root = tmp_path / 'root'
  root.mkdir()
  (tmp_path / 'outside.png').write_bytes(b'x')
  os.symlink(tmp_path / 'outside.png', root / 'link.png')
  with pytest.raises(ValueError, match='escapes'):
    jsonl.resolve_image_path(str(root), 'link.png')


def test_source_reads_chosen_lines_lazily(tmp_path, make_record, make_jsonl):
  path = make_jsonl(str(tmp_path / 'd.jsonl'), [make_record(i) for i in range(3)])
  offsets = {line_no: offset for offset, line_no, _ in jsonl.iter_lines(path)}
  source = jsonl.JsonlSource([path], [0, 0], [offsets[3], offsets[1]], [3, 1])
  assert len(source) == 2
  assert source[0]['id'] == 'r2' and source[1]['id'] == 'r0'
  assert source.where(0) == f'{path}:3'
