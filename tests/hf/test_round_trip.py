"""Hugging Face folder -> train (init_from) -> export -> transformers, through `modes`.

A tiny random LLaVA (Llama + CLIP) is saved by transformers together with its processor
(tokenizer with `<image>` and a chat template, CLIP image processor with non-default
mean/std). Training starts from it with `config.model.init_from`, runs 3 steps on a small
JSONL + PNG dataset, and the export must load in transformers with no key warnings and give
our logits.
"""

import json

import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from configs import sft
from openvlm_jax import modes
from openvlm_jax.data import digits
from openvlm_jax.data import images as images_lib
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import io as hf_io
from openvlm_jax.models.vlm import VLM
from openvlm_jax.training import setup
from tests import tiny_hf

NUM_STEPS = 3
IMAGE_MEAN = (0.25, 0.5, 0.75)
IMAGE_STD = (0.5, 0.25, 0.125)
QUESTIONS = ('<image>\nWhat number is shown?', 'Which digit is this?\n<image>')


def _write_dataset(folder, num_records: int = 8) -> str:
  """A LLaVA JSONL of random 16x16 PNGs with one-digit answers; returns its path."""
  rng = np.random.default_rng(0)
  (folder / 'images').mkdir(parents=True)
  lines = []
  for index in range(num_records):
    pixels = rng.integers(0, 256, size=(tiny_hf.IMAGE_SIZE, tiny_hf.IMAGE_SIZE, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(folder / 'images' / f'{index}.png')
    lines.append(json.dumps({'id': f'r{index}', 'image': f'images/{index}.png', 'conversations': [
        {'from': 'human', 'value': QUESTIONS[index % 2]},
        {'from': 'gpt', 'value': str(index % 10)}]}))
  path = folder / 'train.jsonl'
  path.write_text('\n'.join(lines) + '\n')
  return str(path)


def _save_llava_folder(folder, tokenizer) -> transformers.LlavaForConditionalGeneration:
  """A tiny random LLaVA whose vocabulary and image token are the tokenizer's, plus processor."""
  image_token_id = tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN)
  text_config = tiny_hf.llama_config(vocab_size=len(tokenizer))
  config = transformers.LlavaConfig(
      text_config=text_config, vision_config=tiny_hf.clip_vision_config(),
      image_token_index=image_token_id, vision_feature_layer=-2,
      vision_feature_select_strategy='default', image_seq_length=tiny_hf.NUM_PATCHES)
  model = tiny_hf.build(transformers.LlavaForConditionalGeneration, config, folder)
  image_processor = transformers.CLIPImageProcessor(
      size={'shortest_edge': tiny_hf.IMAGE_SIZE},
      crop_size={'height': tiny_hf.IMAGE_SIZE, 'width': tiny_hf.IMAGE_SIZE},
      image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
  transformers.LlavaProcessor(
      image_processor=image_processor, tokenizer=tokenizer, patch_size=tiny_hf.PATCH_SIZE,
      vision_feature_select_strategy='default', num_additional_image_tokens=1,
      image_token=tokenizer_lib.IMAGE_TOKEN).save_pretrained(folder)
  return model


def init_from_config(init_folder, train_file: str, export_dir, *, seq_len: int,
                     num_steps: int) -> ml_collections.ConfigDict:
  """The tiny SFT recipe started from `init_folder` on `train_file`: batches of 8, quiet,
  strict about records, exporting into `export_dir`."""
  config = sft.get_config('model=tiny')
  config.model.init_from = str(init_folder)
  config.data.train_files = (train_file,)
  config.data.seq_len = seq_len
  config.data.batch_size = 8
  config.data.on_bad_record = 'raise'
  config.optimizer.warmup_steps = 1
  config.training.num_steps = num_steps
  config.training.log_every = num_steps
  config.training.progress_bar = False
  config.export.dir = str(export_dir)
  return config


@pytest.fixture(scope='module')
def round_trip(tmp_path_factory):
  """Trains 3 steps from a saved LLaVA folder and exports the result; returns the pieces."""
  root = tmp_path_factory.mktemp('round_trip')
  train_file = _write_dataset(root / 'data')
  tokenizer = tokenizer_lib.train_tokenizer(
      digits.tokenizer_corpus([train_file]), str(root / 'tokenizer'), vocab_size=300)
  init_folder = root / 'llava'
  _save_llava_folder(init_folder, tokenizer)

  config = init_from_config(init_folder, train_file, root / 'export', seq_len=64,
                            num_steps=NUM_STEPS)
  workdir = str(root / 'workdir')
  modes.train(config, workdir)
  exported = modes.export(config, workdir)
  run = setup.make_run(config, workdir)
  params, step = modes.restore_params(run)
  return dict(config=config, run=run, params=jax.device_get(params), step=step,
              exported=exported, init_folder=init_folder, export_dir=root / 'export',
              image_path=root / 'data' / 'images' / '0.png')


def test_training_started_from_the_folder_and_changed_every_part(round_trip):
  run = round_trip['run']
  assert round_trip['step'] == NUM_STEPS and round_trip['exported']['step'] == NUM_STEPS
  assert run.vlm_config.vision.image_mean == pytest.approx(IMAGE_MEAN)
  assert run.vlm_config.vision.image_std == pytest.approx(IMAGE_STD)
  _, initial = hf_io.load_pretrained(round_trip['init_folder'])
  trained = round_trip['params']
  assert jax.tree.structure(trained) == jax.tree.structure(initial)
  for part in ('vision', 'projector', 'llm'):
    changes = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))),
        trained[part], initial[part]))
    # Started from the folder (small steps) and trained (every part moved).
    assert 0 < max(changes) < 0.1, (part, changes)


def test_export_loads_in_transformers_with_our_logits(round_trip):
  export_dir = round_trip['export_dir']
  hf_model, info = transformers.LlavaForConditionalGeneration.from_pretrained(
      export_dir, output_loading_info=True, attn_implementation='eager', dtype=torch.float32)
  for key in ('missing_keys', 'unexpected_keys', 'mismatched_keys', 'error_msgs'):
    assert not info[key], (key, info[key])
  saved = json.loads((export_dir / 'config.json').read_text())
  original = json.loads((round_trip['init_folder'] / 'config.json').read_text())
  assert saved == original  # every architecture field survives the round trip

  processor = transformers.AutoProcessor.from_pretrained(export_dir)
  image = PIL.Image.open(round_trip['image_path'])
  prompt = processor.tokenizer.apply_chat_template(
      [{'role': 'user', 'content': QUESTIONS[0]}], tokenize=False, add_generation_prompt=True)
  inputs = processor(text=prompt + '7', images=image, return_tensors='pt')
  input_ids = inputs['input_ids'].numpy().astype(np.int32)  # [1, seq]
  image_token_id = processor.tokenizer.convert_tokens_to_ids(tokenizer_lib.IMAGE_TOKEN)
  assert int((input_ids == image_token_id).sum()) == tiny_hf.NUM_PATCHES
  # The exported processor normalises exactly as our data pipeline does.
  vision = round_trip['run'].vlm_config.vision
  ours_pixels = images_lib.load_image(str(round_trip['image_path']), image_size=vision.image_size,
                                      image_mean=vision.image_mean, image_std=vision.image_std)
  their_pixels = inputs['pixel_values'].numpy()[0].transpose(1, 2, 0)  # [H, W, 3]
  np.testing.assert_allclose(ours_pixels, their_pixels, atol=1e-5)

  mask = np.ones_like(input_ids)
  positions = tiny_hf.positions_from_mask(mask)
  model = VLM(round_trip['run'].vlm_config)
  ours = model.apply({'params': round_trip['params']}, input_ids, their_pixels[None, None],
                     positions=positions, attention_mask=mask)
  with torch.no_grad():
    theirs = hf_model(input_ids=inputs['input_ids'], attention_mask=inputs['attention_mask'],
                      pixel_values=inputs['pixel_values']).logits
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'round trip float32 max abs diff {diff:.2e}')
  assert diff <= 1e-4


def test_lora_run_exports_a_peft_adapter_that_peft_loads(round_trip, tmp_path):
  import peft  # pylint: disable=g-import-not-at-top
  config = round_trip['config']
  with config.unlocked():
    config = config.copy_and_resolve_references()
  config.lora.rank, config.lora.alpha = 4, 8.0
  config.lora.targets = (r'llm/.*', r'vision/.*/(fc1|o_proj)')
  config.trainable = (('projector/.*', True),)
  config.optimizer.lr = 0.05  # so that B moves well away from zero in 2 steps
  config.training.num_steps = 2
  config.export.format = 'peft'
  config.export.dir = str(tmp_path / 'adapter')
  workdir = str(tmp_path / 'workdir')
  modes.train(config, workdir)
  exported = modes.export(config, workdir)
  assert exported['format'] == 'peft'
  run = setup.make_run(config, workdir)
  params, _ = modes.restore_params(run)
  params = jax.device_get(params)
  lora_b = params['llm']['layers']['attention']['q_proj']['lora_b']
  assert np.abs(lora_b).max() > 1e-3  # the adapters trained

  adapter_config = json.loads((tmp_path / 'adapter' / 'adapter_config.json').read_text())
  assert adapter_config['base_model_name_or_path'] == str(round_trip['init_folder'])
  assert adapter_config['modules_to_save'] == ['model.multi_modal_projector']
  base = transformers.LlavaForConditionalGeneration.from_pretrained(
      round_trip['init_folder'], attn_implementation='eager', dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(base, tmp_path / 'adapter').eval()

  rng = np.random.default_rng(1)
  input_ids = rng.integers(4, 200, size=(1, 24)).astype(np.int32)
  input_ids[0, 2:2 + tiny_hf.NUM_PATCHES] = run.vlm_config.image_token_id
  pixels = rng.normal(size=(1, tiny_hf.IMAGE_SIZE, tiny_hf.IMAGE_SIZE, 3)).astype(np.float32)
  mask = np.ones_like(input_ids)
  ours = VLM(run.vlm_config).apply({'params': params}, input_ids, pixels[:, None],
                                   positions=tiny_hf.positions_from_mask(mask),
                                   attention_mask=mask)
  with torch.no_grad():
    theirs = peft_model(input_ids=torch.from_numpy(input_ids.astype(np.int64)),
                        attention_mask=torch.from_numpy(mask.astype(np.int64)),
                        pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).logits
  diff = tiny_hf.max_abs_diff_at(ours, theirs, mask)
  print(f'PEFT adapter from --mode=export vs ours max abs diff {diff:.2e}')
  assert diff <= 1e-4
