"""A plugin for Simon Willison's `llm` command-line tool: trained runs as `llm` models.

  llm openvlm-jax register digits runs/demo          # once: the run becomes a model
  llm -m openvlm-jax/digits "What number is shown?" -a digit.png
  llm logs -n 1                                      # the answer, in llm's own SQLite log

The model runs in the `llm` process itself (no server to start): the run's latest
checkpoint, or a Hugging Face folder registered with `--folder`, is loaded with the run's
saved config (`<workdir>/config.json`) and answers through the same engine as
`--mode=serve`, so an answer equals `--mode=predict`'s for the same image and settings.
Loading and compiling cost seconds per `llm` call; for many prompts, serve the run
(`--mode=serve`) and point llm's `extra-openai-models.yaml` at it instead.

Registered runs are kept in `openvlm_jax_runs.json` in llm's user folder (`LLM_USER_PATH`).
This module imports nothing heavy: JAX loads on the first prompt.
"""

import base64
import json
import os
import pathlib
import queue
import threading
from typing import Any

import click
import llm
from pydantic import Field

MODEL_PREFIX = 'openvlm-jax/'
IMAGE_TYPES = frozenset({'image/png', 'image/jpeg', 'image/webp', 'image/gif', 'image/bmp'})


def registry_path() -> pathlib.Path:
  """The JSON file of registered runs, in llm's user folder."""
  return llm.user_dir() / 'openvlm_jax_runs.json'


def registered_runs() -> dict[str, dict[str, str]]:
  """name -> {'workdir', 'folder', 'base'} of every registered run."""
  path = registry_path()
  if not path.exists():
    return {}
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as error:
    raise click.ClickException(f'{path}: not valid JSON ({error})') from None


def _write_runs(runs: dict[str, dict[str, str]]) -> None:
  registry_path().write_text(json.dumps(runs, indent=2, sort_keys=True) + '\n')


class RunModel(llm.Model):
  """One registered run, answering prompts with image attachments."""

  can_stream = True
  attachment_types = IMAGE_TYPES

  class Options(llm.Options):
    temperature: float | None = Field(default=None, ge=0.0, le=2.0,
                                      description='0 is greedy (the run\'s default)')
    max_tokens: int | None = Field(default=None, ge=1,
                                   description='new tokens at most (config.serve.max_new_tokens)')
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description='nucleus sampling')
    seed: int | None = Field(default=None, description='sampling seed')

  def __init__(self, name: str, run: dict[str, str]):
    self.model_id = MODEL_PREFIX + name
    self.run = run

  def execute(self, prompt, stream, response, conversation):
    """Yields the answer (as it is decoded when streaming); records token usage."""
    from openvlm_jax.console import UserError  # pylint: disable=g-import-not-at-top
    from openvlm_jax.serving.engine import RequestError  # pylint: disable=g-import-not-at-top
    engine, config = _engine(self.run)
    options = prompt.options
    try:
      job = engine.prepare(
          to_messages(prompt, conversation), max_tokens=options.max_tokens,
          temperature=(config.serve.temperature if options.temperature is None
                       else options.temperature),
          top_p=1.0 if options.top_p is None else options.top_p, n=1, seed=options.seed,
          stream=stream)
    except (RequestError, UserError) as error:
      raise llm.ModelError(str(error)) from None
    if stream:
      answer = yield from _streamed(engine, job)
    else:
      answer = engine.run_group([job])[0][0]
      yield answer['text']
    response.set_usage(input=job.prompt_tokens, output=answer['completion_tokens'])
    response.response_json = {'finish_reason': answer['finish_reason']}


def _streamed(engine, job):
  """Runs `job` in a thread, yielding its text deltas; returns its answer."""
  deltas: queue.Queue = queue.Queue()
  job.on_delta = lambda choice, text: deltas.put(text)
  outcome: dict[str, Any] = {}

  def generate():
    try:
      outcome['answer'] = engine.run_group([job])[0][0]
    except Exception as error:  # noqa: BLE001 (re-raised in the caller's thread below)
      outcome['error'] = error
    deltas.put(None)

  threading.Thread(target=generate, daemon=True).start()
  while (text := deltas.get()) is not None:
    yield text
  if 'error' in outcome:
    raise outcome['error']
  return outcome['answer']


def _user_message(prompt) -> dict[str, Any]:
  """A prompt and its image attachments as an OpenAI-style user message."""
  parts = []
  for attachment in prompt.attachments:
    if attachment.url and not (attachment.path or attachment.content):
      raise llm.ModelError(f'{attachment.url}: remote images are not fetched; attach a file')
    data = base64.b64encode(attachment.content_bytes()).decode()
    parts.append({'type': 'image_url',
                  'image_url': {'url': f'data:{attachment.resolve_type()};base64,{data}'}})
  parts.append({'type': 'text', 'text': prompt.prompt or ''})
  return {'role': 'user', 'content': parts}


def to_messages(prompt, conversation) -> list[dict[str, Any]]:
  """The system prompt, earlier turns of the conversation and this prompt, as messages."""
  messages = [{'role': 'system', 'content': prompt.system}] if prompt.system else []
  for earlier in (conversation.responses if conversation else []):
    messages.append(_user_message(earlier.prompt))
    messages.append({'role': 'assistant', 'content': earlier.text()})
  return messages + [_user_message(prompt)]


_ENGINES: dict[str, Any] = {}


def _engine(run: dict[str, str]):
  """(the serving engine, the run's config) of a registered run; loaded once per process."""
  key = json.dumps(run, sort_keys=True)
  if key not in _ENGINES:
    _ENGINES[key] = _load_engine(run)
  return _ENGINES[key]


def _load_engine(run: dict[str, str]):
  os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from openvlm_jax import modes  # pylint: disable=g-import-not-at-top
  from openvlm_jax.console import UserError  # pylint: disable=g-import-not-at-top
  config = saved_config(run['workdir'], run.get('base', ''))
  with config.unlocked():
    config.serve.folder = run.get('folder', '')
  try:
    engine, _ = modes.serving_engine(config, run['workdir'])
  except UserError as error:
    raise llm.ModelError(str(error)) from None
  return engine, config


def saved_config(workdir: str, base: str = ''):
  """The resolved config a training run wrote (`<workdir>/config.json`).

  Relative model and tokenizer folders in it are taken relative to `base`, the folder the
  run was registered from (where it was trained).
  """
  import ml_collections  # pylint: disable=g-import-not-at-top

  from openvlm_jax.training import setup  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise llm.ModelError(f'{path}: missing; register the workdir of a training run')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  for key in setup.FOLDER_KEYS:
    section, _, name = key.rpartition('.')
    target = config[section] if section else config
    value = target[name]
    if value and base and ':' not in value and not os.path.isabs(value):
      target[name] = os.path.join(base, value)
  return config


@llm.hookimpl
def register_models(register):
  """Each registered run as model `openvlm-jax/<name>`."""
  for name, run in registered_runs().items():
    register(RunModel(name, run))


@llm.hookimpl
def register_commands(cli):
  """`llm openvlm-jax register | runs | remove`."""

  @cli.group(name='openvlm-jax')
  def group():
    """Runs of OpenVLM-JAX as llm models (openvlm-jax/<name>)."""

  @group.command(name='register')
  @click.argument('name')
  @click.argument('workdir', type=click.Path(exists=True, file_okay=False))
  @click.option('--folder', type=click.Path(exists=True, file_okay=False), default=None,
                help='Serve this Hugging Face folder (e.g. --mode=export\'s) instead of the '
                'latest checkpoint.')
  def register_run(name, workdir, folder):
    """Registers WORKDIR (a training run's folder) as model openvlm-jax/NAME."""
    if not os.path.isfile(os.path.join(workdir, 'config.json')):
      raise click.ClickException(f'{workdir}: no config.json; is it a training run\'s workdir?')
    runs = registered_runs()
    runs[name] = {'workdir': os.path.abspath(workdir),
                  'folder': os.path.abspath(folder) if folder else '', 'base': os.getcwd()}
    _write_runs(runs)
    click.echo(f'registered {MODEL_PREFIX}{name} -> {runs[name]["workdir"]}')

  @group.command(name='runs')
  def list_runs():
    """Lists the registered runs."""
    for name, run in sorted(registered_runs().items()):
      click.echo(f'{MODEL_PREFIX}{name}: {run["workdir"]}'
                 + (f' (folder {run["folder"]})' if run.get('folder') else ''))

  @group.command(name='remove')
  @click.argument('name')
  def remove_run(name):
    """Forgets the run registered as NAME."""
    runs = registered_runs()
    if name not in runs:
      raise click.ClickException(f'no run registered as {name!r}; see llm openvlm-jax runs')
    del runs[name]
    _write_runs(runs)
    click.echo(f'removed {MODEL_PREFIX}{name}')
