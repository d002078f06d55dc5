"""A small byte-level BPE tokenizer with one token per digit, saved in Hugging Face format.

Numbers are split into single digits before BPE sees them (a `Digits` pre-tokenizer runs
ahead of the byte-level one), so "47" is always the two tokens "4", "7" and a space before a
number is its own token "Ġ": the model reads and writes numbers digit by digit, and the
segmentation at training time and at encoding time is the same because both come from the
pre-tokenizer stored in `tokenizer.json`.
"""

import os
from collections.abc import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from openvlm_jax.console import UserError

PAD_TOKEN = '<pad>'
BOS_TOKEN = '<s>'
EOS_TOKEN = '</s>'
IMAGE_TOKEN = '<image>'
# Order fixes the ids: <pad>=0, <s>=1, </s>=2, <image>=3 (VLMConfig.image_token_id's default).
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

# Renders e.g. "<s>user:\n<image>\nWhat number is shown?\nassistant:\n7</s>\n". Each assistant
# reply ends with the eos token, which the loss mask keeps so the model learns to stop. Role
# headers end in a newline, not a space: byte-level BPE glues a space to the next word
# ("ĠThe"), so a prompt ending in a space would tokenize differently in training (reply
# attached) and generation (prompt alone); a newline is always its own pre-token. Content is
# a string, or typed parts as transformers' processors write them ({"type": "image"} renders
# as "<image>\n", like the placeholder in a string), so an exported folder's processor
# takes either.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] }}:{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}assistant:{{ '\\n' }}{% endif %}"
)


def _make_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
  """Digits first (each digit alone), then GPT-2 style byte-level splitting."""
  return pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
  ])


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str,
    vocab_size: int = 512,
    min_frequency: int = 2,
) -> transformers.PreTrainedTokenizerBase:
  """Trains a byte-level BPE tokenizer on `texts` and saves it to `out_dir`.

  Args:
    texts: training texts (e.g. from `digits.tokenizer_corpus`). Special tokens such as
      `<image>` should not appear in them; they are added separately.
    out_dir: folder written with `save_pretrained`; `transformers.AutoTokenizer` reloads it
      offline with its chat template and special tokens.
    vocab_size: upper bound on the vocabulary, special tokens and 256 byte symbols included.
    min_frequency: pairs seen fewer times are not merged.

  Returns:
    The trained tokenizer, as reloaded from `out_dir`.
  """
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = _make_pre_tokenizer()
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size,
      min_frequency=min_frequency,
      special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False,
  )
  tokenizer.train_from_iterator(texts, trainer)
  hf_tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=tokenizer,
      bos_token=BOS_TOKEN,
      eos_token=EOS_TOKEN,
      pad_token=PAD_TOKEN,
      extra_special_tokens={'image_token': IMAGE_TOKEN},
      padding_side='right',
  )
  hf_tokenizer.chat_template = CHAT_TEMPLATE
  os.makedirs(out_dir, exist_ok=True)
  hf_tokenizer.save_pretrained(out_dir)
  return load_tokenizer(out_dir)


def load_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """Loads a Hugging Face tokenizer folder offline (ours or a model's own)."""
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def add_missing_tokens(tokenizer: transformers.PreTrainedTokenizerBase) -> list[str]:
  """Adds `<image>` and `<pad>` as special tokens where the tokenizer has none (in place).

  This is what LLaVA's training code does for a decoder that was never shown images. The
  model's embedding must then grow to `len(tokenizer)` rows (`hf.io.load_llm_and_vision`).

  Returns:
    The tokens added, in id order (empty if the tokenizer already had both).
  """
  added = []
  if find_image_token(tokenizer) is None:
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    added.append(IMAGE_TOKEN)
  if tokenizer.pad_token is None:
    tokenizer.add_special_tokens({'pad_token': PAD_TOKEN})
    added.append(PAD_TOKEN)
  return added


def find_image_token(tokenizer: transformers.PreTrainedTokenizerBase) -> str | None:
  """The tokenizer's image placeholder token: its `image_token` if set, else `<image>` if in
  its vocabulary, else None."""
  image_token = getattr(tokenizer, 'image_token', None)
  if image_token:
    return str(image_token)
  return IMAGE_TOKEN if IMAGE_TOKEN in tokenizer.get_vocab() else None


def image_token_of(tokenizer: transformers.PreTrainedTokenizerBase) -> str:
  """`find_image_token`, which must find one.

  Raises:
    UserError: the tokenizer has no image token.
  """
  image_token = find_image_token(tokenizer)
  if image_token is None:
    raise UserError(f'The tokenizer has no image token ({IMAGE_TOKEN!r} is not in its vocab).')
  return image_token
