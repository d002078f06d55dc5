"""Stage 1 from a decoder whose tokenizer lacks an image (or pad) token, a tiny random one
and SmolLM2-135M's real weights: the run adds the tokens, grows the embedding, trains the
projector alone, and exports a folder transformers loads with the decoder untouched."""

import json
import os

import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from configs import sft
from openvlm_jax import modes
from openvlm_jax.data import digits
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import packaged
from tests import tiny_hf


def _decoder_tokenizer(texts, folder):
  """A byte-level BPE with bos/eos only, shaped like a text LLM's (no <image>, no pad)."""
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  tokenizer.train_from_iterator(texts, trainers.BpeTrainer(
      vocab_size=300, special_tokens=['<s>', '</s>'], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token='<s>',
                                              eos_token='</s>')
  fast.chat_template = tokenizer_lib.CHAT_TEMPLATE
  fast.save_pretrained(folder)
  return fast


def _tiny_decoder(root, train_file):
  """A tiny random Llama whose tokenizer has neither an image nor a pad token."""
  folder = root / 'llm'
  text_tokenizer = _decoder_tokenizer(digits.tokenizer_corpus([str(train_file)]), folder)
  tiny_hf.build(transformers.LlamaForCausalLM,
                tiny_hf.llama_config(vocab_size=len(text_tokenizer)), folder)
  return folder, ['<image>', '<pad>']


def _smollm2(root, train_file):
  """SmolLM2-135M-Instruct's real weights; its tokenizer has a pad token but no image token."""
  del root, train_file
  pytest.importorskip('gguf')
  return packaged.smollm2_folder(), ['<image>']


DECODERS = {'tiny': _tiny_decoder, 'smollm2': _smollm2}
TOWERS = {
    'clip': (transformers.CLIPVisionModel, tiny_hf.clip_vision_config),
    'dinov2': (transformers.Dinov2Model, tiny_hf.dinov2_config),  # its table resized
}


@pytest.fixture(scope='module', params=[('tiny', 'clip'), ('tiny', 'dinov2'),
                                        ('smollm2', 'clip')], ids='-'.join)
def stage1_run(request, tmp_path_factory):
  """(config, workdir, the decoder's torch model, its vocabulary, the tokens to be added)
  after 2 stage-1 steps from that decoder and a tiny vision tower."""
  decoder, tower = request.param
  root = tmp_path_factory.mktemp('stage1')
  files = digits.build_digits_dataset(str(root / 'data'), image_size=16)
  with open(files['train']) as f:
    head = f.readlines()[:32]
  train_file = root / 'data' / 'train_head.jsonl'
  train_file.write_text(''.join(head))
  llm_folder, added = DECODERS[decoder](root, train_file)
  hf_llm = transformers.LlamaForCausalLM.from_pretrained(llm_folder, dtype=torch.float32).eval()
  vocab = hf_llm.config.vocab_size
  vision_folder = root / 'vision'
  model_cls, vision_config = TOWERS[tower]
  tiny_hf.build(model_cls, vision_config(), vision_folder)
  if tower == 'dinov2':
    tiny_hf.save_image_processor(vision_folder)
  config = sft.get_config('model=tiny,steps=2,recipe=stage1')
  config.model.llm_from, config.model.vision_from = str(llm_folder), str(vision_folder)
  config.data.train_files = (str(train_file),)
  config.data.batch_size, config.data.seq_len = 8, 96  # SmolLM2's template adds a system turn
  config.training.progress_bar = False
  workdir = str(root / 'workdir')
  modes.train(config, workdir)
  return config, workdir, hf_llm, vocab, added


def test_stage1_adds_the_tokens_and_exports_with_the_decoder_untouched(stage1_run, tmp_path):
  # One test per run: each run is built once per test process.
  config, workdir, hf_llm, vocab, added = stage1_run
  saved = tokenizer_lib.load_tokenizer(os.path.join(workdir, 'tokenizer'))
  assert len(saved) == vocab + len(added)
  assert saved.convert_tokens_to_ids(added) == list(range(vocab, vocab + len(added)))
  assert saved.pad_token is not None
  # '<image>' is one special token: text holding it tokenizes to its id.
  assert saved('a <image> b')['input_ids'].count(vocab) == 1

  config = config.copy_and_resolve_references()
  config.export.dir = str(tmp_path)
  modes.export(config, workdir)
  raw = json.loads((tmp_path / 'config.json').read_text())
  assert raw['text_config']['vocab_size'] == vocab + len(added)
  assert raw['image_token_index'] == vocab
  model = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path,
                                                                     dtype=torch.float32)
  processor = transformers.AutoProcessor.from_pretrained(tmp_path)
  assert processor.tokenizer.convert_tokens_to_ids('<image>') == vocab

  # The new rows start at the mean of the old ones, and stage 1 leaves them as they were.
  lm_head = model.lm_head.weight.detach().numpy()
  original = hf_llm.lm_head.weight.detach().numpy()
  np.testing.assert_allclose(
      lm_head[vocab:], np.repeat(original.mean(0, keepdims=True), len(added), 0), atol=1e-6)
  # A text-only prompt gives the decoder's own logits over its vocabulary (the LLM was frozen).
  input_ids = torch.tensor([processor.tokenizer('user:\nWhat number is shown?')['input_ids']])
  with torch.no_grad():
    ours = model(input_ids=input_ids).logits.numpy()
    theirs = hf_llm(input_ids=input_ids).logits.numpy()
  assert ours.shape[-1] == vocab + len(added)
  np.testing.assert_allclose(ours[..., :vocab], theirs, atol=1e-4)
