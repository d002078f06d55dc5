"""LLaVA-NeXT / OneVision folder -> train (init_from) -> export -> transformers, through `modes`.

A tiny random anyres model is saved by transformers with its processor (NeXT) or image
processor (OneVision: its processor needs torchvision) and the tokenizer of our digits data.
Training tiles the photos of a small JSONL dataset (three aspect ratios, so three grids), the
export loads in transformers, and there its processor's tokens and pixels and its model's
logits are those of our data pipeline and model; greedy answers from `--mode=predict` are
transformers' `generate`, and the server's are the same.
"""

import base64
import json

import jax
import numpy as np
import pytest
import skimage.data
import torch
import transformers
from PIL import Image
from transformers.models.llava_next.image_processing_pil_llava_next import (
    LlavaNextImageProcessorPil,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from openvlm_jax import modes
from openvlm_jax.data import conversation, digits
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import io as hf_io
from openvlm_jax.models.vlm import VLM
from openvlm_jax.serving import engine as engine_lib
from openvlm_jax.training import setup
from openvlm_jax.training import step as step_lib
from tests import tiny_hf
from tests.hf import test_round_trip

NUM_STEPS = 2
SIZES = ((40, 18), (17, 45), (30, 30))  # (width, height): 1x3, 3x1 and 2x2 crops
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)  # OneVision's own; NeXT's are set below
NEXT_MEAN, NEXT_STD = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
QUESTION = '<image>\nWhat number is shown?'
MODELS = {'next': transformers.LlavaNextForConditionalGeneration,
          'onevision': transformers.LlavaOnevisionForConditionalGeneration}


def _write_dataset(folder, num_records: int = 6) -> str:
  """A LLaVA JSONL of package photos at three aspect ratios with one-digit answers."""
  (folder / 'images').mkdir(parents=True)
  photo = Image.fromarray(skimage.data.astronaut())
  lines = []
  for index in range(num_records):
    photo.resize(SIZES[index % len(SIZES)]).save(folder / 'images' / f'{index}.png')
    lines.append(json.dumps({'id': f'r{index}', 'image': f'images/{index}.png', 'conversations': [
        {'from': 'human', 'value': QUESTION}, {'from': 'gpt', 'value': str(index % 10)}]}))
  path = folder / 'train.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _save_folder(kind: str, folder, tokenizer):
  """A tiny random NeXT (Llama + CLIP) or OneVision (Qwen2 + SigLIP) model whose vocabulary
  and image token are the tokenizer's, and what processes its inputs."""
  image_token_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN)
  if kind == 'next':
    config = tiny_hf.llava_next_config()
    processor = transformers.LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={'shortest_edge': tiny_hf.IMAGE_SIZE},
            crop_size={'height': tiny_hf.IMAGE_SIZE, 'width': tiny_hf.IMAGE_SIZE},
            image_grid_pinpoints=tiny_hf.PINPOINTS, image_mean=list(NEXT_MEAN),
            image_std=list(NEXT_STD)),
        tokenizer=tokenizer, patch_size=tiny_hf.PATCH_SIZE,
        vision_feature_select_strategy='default', num_additional_image_tokens=1,
        image_token=tokenizer_lib.IMAGE_TOKEN)
  else:
    config = tiny_hf.llava_onevision_config()
    config.video_token_index = len(tokenizer)  # a row of its own, past the tokenizer's
    processor = LlavaOnevisionImageProcessorPil(
        size={'height': tiny_hf.IMAGE_SIZE, 'width': tiny_hf.IMAGE_SIZE},
        image_grid_pinpoints=tiny_hf.ONEVISION_PINPOINTS, image_mean=list(MEAN),
        image_std=list(STD))
    tokenizer.save_pretrained(folder)
  config.text_config.vocab_size = len(tokenizer) + 1
  config.image_token_index = image_token_id
  tiny_hf.build(MODELS[kind], config, folder)
  processor.save_pretrained(folder)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """kind -> its round trip, each built once whatever order the tests run in."""
  built = {}
  def get(kind: str) -> dict:
    if kind not in built:
      built[kind] = _round_trip(kind, tmp_path_factory.mktemp(kind))
    return built[kind]
  return get


@pytest.fixture(params=sorted(MODELS))
def round_trip(request, trained):
  return trained(request.param)


def _round_trip(kind: str, root) -> dict:
  """Trains from a saved anyres folder, exports, and answers the training questions."""
  train_file = _write_dataset(root / 'data')
  tokenizer = tokenizer_lib.train_tokenizer(
      digits.tokenizer_corpus([train_file]), str(root / 'tokenizer'), vocab_size=300)
  _save_folder(kind, root / 'init', tokenizer)
  config = test_round_trip.init_from_config(root / 'init', train_file, root / 'export',
                                            seq_len=128, num_steps=NUM_STEPS)
  config.predict.input = train_file
  config.predict.output = str(root / 'predictions.jsonl')
  config.predict.max_new_tokens = 3
  config.predict.batch_size = 8
  workdir = str(root / 'workdir')
  modes.train(config, workdir)
  modes.export(config, workdir)
  modes.predict(config, workdir)
  run = setup.make_run(config, workdir)
  params, _ = modes.restore_params(run)
  return dict(kind=kind, run=run, params=jax.device_get(params), root=root,
              train_file=train_file)


def test_training_tiled_the_images_and_moved_image_newline(round_trip):
  run, root = round_trip['run'], round_trip['root']
  assert run.vlm_config.image_grid_pinpoints  # an anyres model
  _, initial = hf_io.load_pretrained(root / 'init')
  moved = np.abs(np.asarray(round_trip['params']['image_newline'])
                 - np.asarray(initial['image_newline'])).max()
  assert 0 < moved < 0.1  # the newline rows were in the training sequences
  spec = setup.example_spec(run)
  image_id = conversation.image_token_id(run.tokenizer, 1)
  counts = {int((examples_lib.make_example(_record(root, index), spec)['input_ids']
                 == image_id).sum()) for index in range(len(SIZES))}
  assert len(counts) == len(SIZES)  # each aspect ratio its own number of image tokens


def _record(root, index: int, answer: bool = True) -> dict:
  """Training record `index` as the pipeline reads it (with its answer, or only the question)."""
  turns = [{'from': 'human', 'value': QUESTION}]
  turns += [{'from': 'gpt', 'value': str(index % 10)}] if answer else []
  return {'conversations': turns, 'image_paths': [str(root / 'data' / 'images' / f'{index}.png')],
          'where': f'train.jsonl:{index + 1}'}


def _hf_pixels(kind: str, export_dir, photo: Image.Image) -> dict:
  """The exported image processor's pixel_values and image_sizes for one photo."""
  image_processor = (transformers.AutoProcessor.from_pretrained(export_dir).image_processor
                     if kind == 'next' else
                     LlavaOnevisionImageProcessorPil.from_pretrained(export_dir))
  inputs = image_processor(photo, return_tensors='pt')
  return {'pixel_values': inputs['pixel_values'], 'image_sizes': inputs['image_sizes']}


def test_export_reads_our_examples_as_transformers_does(round_trip):
  kind, run, root = round_trip['kind'], round_trip['run'], round_trip['root']
  export_dir = root / 'export'
  hf_model, info = MODELS[kind].from_pretrained(
      export_dir, output_loading_info=True, attn_implementation='eager', dtype=torch.float32)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info[key], (key, info[key])
  assert hf_model.config.image_grid_pinpoints == json.loads(
      (root / 'init' / 'config.json').read_text())['image_grid_pinpoints']

  spec = setup.example_spec(run)
  for index, size in enumerate(SIZES):
    record = _record(root, index)
    example = examples_lib.make_example(record, spec)
    num_tokens = int(example['attention_mask'].sum())
    photo = Image.open(record['image_paths'][0])
    inputs = _hf_pixels(kind, export_dir, photo)
    if kind == 'next':  # the exported processor writes our tokens
      text = run.tokenizer.apply_chat_template(
          conversation.to_messages(record['conversations'], num_images=1,
                                   image_token=tokenizer_lib.IMAGE_TOKEN), tokenize=False)
      processor = transformers.AutoProcessor.from_pretrained(export_dir)
      theirs = processor(text=text, images=photo, add_special_tokens=False,
                         return_tensors='np')['input_ids'][0]
      np.testing.assert_array_equal(theirs, example['input_ids'][:num_tokens])
    batch = {key: value[None] for key, value in example.items()}
    ours = step_lib.model_logits(VLM(run.vlm_config), round_trip['params'], batch)
    input_ids = torch.from_numpy(example['input_ids'][None, :num_tokens]).long()
    with torch.no_grad():
      theirs = hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                        pixel_values=inputs['pixel_values'],
                        image_sizes=inputs['image_sizes']).logits
    mask = np.ones((1, num_tokens), np.int32)
    diff = tiny_hf.max_abs_diff_at(np.asarray(ours)[:, :num_tokens], theirs, mask)
    print(f'{kind} {size} float32 max abs diff {diff:.2e}')
    assert diff <= 1e-4


def test_predict_answers_as_transformers_generates(round_trip):
  kind, run, root = round_trip['kind'], round_trip['run'], round_trip['root']
  hf_model = MODELS[kind].from_pretrained(root / 'export', attn_implementation='eager',
                                          dtype=torch.float32)
  predictions = [json.loads(line) for line in open(root / 'predictions.jsonl')]
  assert len(predictions) == 6
  spec = setup.example_spec(run)
  for index, prediction in enumerate(predictions[:len(SIZES)]):
    record = _record(root, index, answer=False)
    prompt, _ = examples_lib.encode_prompt(record, spec)
    inputs = _hf_pixels(kind, root / 'export', Image.open(record['image_paths'][0]))
    input_ids = torch.from_numpy(prompt[None]).long()
    with torch.no_grad():
      out = hf_model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                              pixel_values=inputs['pixel_values'],
                              image_sizes=inputs['image_sizes'], max_new_tokens=3,
                              do_sample=False, eos_token_id=run.tokenizer.eos_token_id,
                              pad_token_id=run.tokenizer.pad_token_id)
    theirs = run.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True,
                                  clean_up_tokenization_spaces=False).strip()
    assert prediction['answer'] == theirs, (prediction, theirs)


def test_the_server_answers_as_predict(round_trip):
  run, root = round_trip['run'], round_trip['root']
  predictions = [json.loads(line) for line in open(root / 'predictions.jsonl')]
  engine = engine_lib.Engine(VLM(run.vlm_config), round_trip['params'], setup.example_spec(run),
                             run.tokenizer, engine_lib.Limits(max_new_tokens=3, max_batch=2))
  jobs = []
  for index in range(2):  # two aspect ratios in one decoder call
    data = (root / 'data' / 'images' / f'{index}.png').read_bytes()
    url = 'data:image/png;base64,' + base64.b64encode(data).decode()
    jobs.append(engine.prepare(
        [{'role': 'user', 'content': [{'type': 'image_url', 'image_url': {'url': url}},
                                      {'type': 'text', 'text': 'What number is shown?'}]}],
        max_tokens=3, temperature=0.0, top_p=1.0, n=1, seed=None))
  answers = [choices[0]['text'].strip() for choices in engine.run_group(jobs)]
  assert answers == [prediction['answer'] for prediction in predictions[:2]]
