"""What a run is made of before its first step: files, tokenizer, model config, mesh, data."""

import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import transformers
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from openvlm_jax import checkpoint, config_lib, console, inference, objectives, parallel
from openvlm_jax.console import UserError
from openvlm_jax.data import anyres, charts, digits, pipeline, sources
from openvlm_jax.data import examples as examples_lib
from openvlm_jax.data import tokenizer as tokenizer_lib
from openvlm_jax.hf import io as hf_io
from openvlm_jax.hf import packaged
from openvlm_jax.models import lora as lora_lib
from openvlm_jax.models.config import VLMConfig
from openvlm_jax.models.vlm import VLM
from openvlm_jax.training import evaluate, rollout
from openvlm_jax.training import optimizer as optimizer_lib
from openvlm_jax.training import state as state_lib


@dataclasses.dataclass
class Run:
  """The pieces every mode (train, eval, predict, export) starts from."""

  config: ml_collections.ConfigDict
  workdir: str
  mesh: Mesh
  tokenizer: transformers.PreTrainedTokenizerBase
  vlm_config: VLMConfig
  model: VLM
  train_files: tuple[str, ...]
  eval_files: tuple[str, ...]

  @property
  def has_eval(self) -> bool:
    return bool(self.eval_files)


def data_files(config: ml_collections.ConfigDict, workdir: str,
               build_demo: bool = True) -> tuple[tuple, tuple]:
  """The train and eval sources (`data.sources`); the embedded dataset when none are configured.

  With `build_demo` False (every mode but train) the demo data must already be there.
  """
  if config.data.train_files:
    for key in ('train_files', 'eval_files'):
      for index, spec in enumerate(config.data[key]):
        sources.check_spec(spec, f'config.data.{key}[{index}]')
    return tuple(config.data.train_files), tuple(config.data.eval_files)
  folder = os.path.join(workdir, 'data')
  builder = charts if config.data.demo_task == 'charts' else digits
  if not build_demo:
    built = builder.built_files(folder)
    if built is None:
      raise UserError(f'no demo data in {folder}: this workdir was not trained with the '
                      'embedded demo; pass its --config.data.train_files')
  elif builder is charts:  # train on the train tables, evaluate on the val tables
    built = charts.build_chart_dataset(folder, seed=config.seed)
  else:
    built = digits.build_digits_dataset(
        folder, seed=config.seed, task=config.data.demo_task,
        image_size=config.model.vision.image_size, train_repeats=config.data.demo_train_repeats)
  return (built['train'],), (built['val' if builder is charts else 'eval'],)


def load_or_train_tokenizer(config: ml_collections.ConfigDict, workdir: str,
                            train_files: tuple[str, ...]) -> transformers.PreTrainedTokenizerBase:
  """The configured tokenizer, the one beside the Hugging Face weights, or one trained once.

  A named tokenizer without an image or pad token gets them (`add_missing_tokens`) and is
  saved as the run's own in `workdir/tokenizer`, which later loads (resume, eval, export)
  read; the model's vocabulary grows to match (`model_config`).
  """
  folder = config.tokenizer or config.model.init_from or config.model.llm_from
  run_folder = os.path.join(workdir, 'tokenizer')
  if folder:
    tokenizer = tokenizer_lib.load_tokenizer(folder)
    vocab_before = len(tokenizer)
    added = tokenizer_lib.add_missing_tokens(tokenizer)
    if not added:
      return tokenizer
    if os.path.exists(os.path.join(run_folder, 'tokenizer_config.json')):
      return tokenizer_lib.load_tokenizer(run_folder)
    tokenizer.save_pretrained(run_folder)
    console.say(f'{folder}: the tokenizer has no {" or ".join(added)}; added as special '
                f'token(s) (vocabulary {vocab_before} -> {len(tokenizer)}, saved in '
                f'{run_folder}); new embedding rows start at the mean of the others')
    return tokenizer_lib.load_tokenizer(run_folder)
  folder = run_folder
  if not os.path.exists(os.path.join(folder, 'tokenizer.json')):
    if not train_files:
      raise UserError(f'no tokenizer in {folder} and no data to train one on; pass '
                      '--config.tokenizer=<folder>')
    logging.info('Training a tokenizer on %s into %s', train_files, folder)
    tokenizer_lib.train_tokenizer(digits.tokenizer_corpus(train_files), folder)
  return tokenizer_lib.load_tokenizer(folder)


@dataclasses.dataclass(frozen=True)
class ModelSource:
  """Where a run's model comes from (`config_lib.model_source`): its architecture and weights.

  config: (config, tokenizer, runtime fields) -> VLMConfig.
  params: (run, param shardings, runtime fields) -> float params placed with the shardings,
      or None (the model starts from its initializers).
  """

  config: Callable[..., VLMConfig]
  params: Callable[..., Any]


def _image_token_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
  return tokenizer.convert_tokens_to_ids(tokenizer_lib.image_token_of(tokenizer))


MODEL_SOURCES = {
    # A Hugging Face LLaVA folder: architecture and weights.
    'hf_folder': ModelSource(
        config=lambda config, tokenizer, runtime: hf_io.load_config(config.model.init_from,
                                                                    **runtime),
        params=lambda run, shardings, runtime: hf_io.load_pretrained(
            run.config.model.init_from, shardings=shardings, **runtime)[1]),
    # A bare LLM folder and a vision-tower folder, with a fresh projector.
    'stage1': ModelSource(
        config=lambda config, tokenizer, runtime: hf_io.load_stage1_config(
            config.model.llm_from, config.model.vision_from, projector=config.model.projector,
            image_token_id=_image_token_id(tokenizer), vocab_size=len(tokenizer), **runtime),
        params=lambda run, shardings, runtime: hf_io.load_llm_and_vision(
            run.config.model.llm_from, run.config.model.vision_from,
            image_token_id=run.vlm_config.image_token_id, rng=jax.random.key(run.config.seed),
            projector=run.vlm_config.projector, vocab_size=run.vlm_config.llm.vocab_size,
            shardings=shardings, **runtime)[1]),
    # From scratch: the architecture of `config.model`, random weights.
    'scratch': ModelSource(
        config=lambda config, tokenizer, runtime: config_lib.build_vlm_config(
            config.model, vocab_size=len(tokenizer), image_token_id=_image_token_id(tokenizer),
            lora=config.lora),
        params=lambda run, shardings, runtime: None),
}


def model_config(config: ml_collections.ConfigDict,
                 tokenizer: transformers.PreTrainedTokenizerBase) -> VLMConfig:
  """The architecture from a Hugging Face folder when starting from one, else from the config.

  How the model computes (`config_lib.RUNTIME_FIELDS`) always comes from `config.model`.
  """
  runtime = dict(config_lib.runtime_fields(config.model),
                 lora=config_lib.lora_config(config.lora))
  source = config_lib.model_source(config.model)
  vlm_config = MODEL_SOURCES[source].config(config, tokenizer, runtime)
  vlm_config = with_tower_image_size(vlm_config, config.model.tower_image_size)
  return with_tile_limit(vlm_config, config.data.max_tiles)


def with_tile_limit(vlm_config: VLMConfig, max_tiles: int) -> VLMConfig:
  """The VLM config with only the anyres grids of at most `max_tiles` crops (0: all).

  The limit is the model's from then on, so an exported folder tiles as training did.

  Raises:
    UserError: the model is not anyres, or no grid is that small.
  """
  if not max_tiles:
    return vlm_config
  key = f'config.data.max_tiles={max_tiles}'
  if not vlm_config.image_grid_pinpoints:
    raise UserError(f'{key}: the model does not tile images (no image_grid_pinpoints)')
  try:
    pinpoints = anyres.limited_pinpoints(vlm_config.image_grid_pinpoints,
                                         vlm_config.vision.image_size, max_tiles)
  except ValueError as error:
    raise UserError(f'{key}: {error}') from error
  return dataclasses.replace(vlm_config, image_grid_pinpoints=pinpoints)


def with_tower_image_size(vlm_config: VLMConfig, image_size: int) -> VLMConfig:
  """The VLM config with its DINOv2 tower reading `image_size` pixels (0: unchanged).

  Raises:
    UserError: the tower is not DINOv2 (CLIP and SigLIP tables have one size), or the size
      is not a multiple of the patch size.
  """
  vision = vlm_config.vision
  if not image_size or image_size == vision.image_size:
    return vlm_config
  key = f'config.model.tower_image_size={image_size}'
  if vision.kind != 'dinov2':
    raise UserError(f'{key}: only a DINOv2 tower resizes its position table; this '
                    f'{vision.kind} tower reads {vision.image_size} px')
  if image_size % vision.patch_size:
    raise UserError(f'{key}: not a multiple of the patch size {vision.patch_size}')
  return dataclasses.replace(vlm_config,
                             vision=dataclasses.replace(vision, image_size=image_size))


def make_run(config: ml_collections.ConfigDict, workdir: str, build_demo: bool = True,
             with_data: bool = True) -> Run:
  """Starts the multi-host runtime, builds the mesh, and resolves files, tokenizer and model.

  `build_demo` False (eval, predict, export) reads the demo data and tokenizer a training
  run left in the workdir instead of building them. `with_data` False (serving) looks for no
  data files at all: the tokenizer must be configured or in the workdir already.
  """
  parallel.initialize_distributed()
  config = with_packaged_folders(config)
  mesh = parallel.make_mesh(config.mesh)
  check_batch_fits_mesh(config, mesh)
  files_of = lambda: data_files(config, workdir, build_demo) if with_data else ((), ())
  # Process 0 builds the demo data and tokenizer (once per workdir); the others then load them.
  if jax.process_index() == 0:
    load_or_train_tokenizer(config, workdir, files_of()[0])
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('openvlm_jax: data and tokenizer ready')
  train_files, eval_files = files_of()
  tokenizer = load_or_train_tokenizer(config, workdir, train_files)
  vlm_config = model_config(config, tokenizer)
  check_sequence_fits_images(config, vlm_config)
  return Run(config=config, workdir=workdir, mesh=mesh, tokenizer=tokenizer,
             vlm_config=vlm_config, model=VLM(vlm_config), train_files=train_files,
             eval_files=eval_files)


FOLDER_KEYS = ('tokenizer', 'model.init_from', 'model.llm_from', 'model.vision_from')


def with_packaged_folders(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose 'packaged:<name>' folders (`hf.packaged`) are real paths.

  Process 0 builds a missing one first; the others then find it.
  """
  def value_of(config, key):
    for name in key.split('.'):
      config = config[name]
    return config

  named = [key for key in FOLDER_KEYS if value_of(config, key).startswith(packaged.SCHEME)]
  if not named:
    return config
  if jax.process_index() == 0:
    for key in named:
      packaged.resolve(value_of(config, key))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('openvlm_jax: packaged weights ready')
  resolved = config.copy_and_resolve_references()
  with resolved.unlocked():
    for key in named:
      section, _, name = key.rpartition('.')
      target = resolved[section] if section else resolved
      target[name] = packaged.resolve(target[name])
  return resolved


def check_batch_fits_mesh(config: ml_collections.ConfigDict, mesh: Mesh) -> None:
  """The global batch (and each micro-batch) must split over processes and batch devices."""
  batch_size, accum = config.data.batch_size, config.optimizer.grad_accum_steps
  batch_devices = math.prod(mesh.shape[axis] for axis in parallel.BATCH_AXES)
  micro = batch_size // accum
  if batch_size % jax.process_count() or micro % batch_devices:
    raise UserError(
        f'config.data.batch_size={batch_size}: with grad_accum_steps={accum}, each micro-batch '
        f'of {micro} rows must split over the {batch_devices} devices of the mesh axes '
        f'{parallel.BATCH_AXES} (and over {jax.process_count()} processes); use a multiple of '
        f'{batch_devices * accum}')


def check_sequence_fits_images(config: ml_collections.ConfigDict, vlm_config: VLMConfig) -> None:
  """`data.seq_len` must leave room for text after `max_images` images' tokens."""
  image_tokens = config.data.max_images * vlm_config.vision.num_image_tokens
  if config.data.seq_len <= image_tokens:
    raise UserError(
        f'config.data.seq_len={config.data.seq_len}: {config.data.max_images} image(s) of '
        f'{vlm_config.vision.num_image_tokens} tokens take {image_tokens}; raise seq_len or '
        'lower data.max_images')


def check_images_are_single_view(config: ml_collections.ConfigDict, vlm_config: VLMConfig,
                                 what: str) -> None:
  """Anyres models (LLaVA-NeXT, OneVision folders) train, evaluate, predict and export, but
  `what` (serving, GRPO's rollouts) does not tile images yet."""
  if vlm_config.image_grid_pinpoints:
    raise UserError(
        f'config.model.init_from={config.model.init_from}: a LLaVA-NeXT/OneVision model '
        f'(image_grid_pinpoints) trains, evaluates, predicts and exports, but {what} does '
        'not tile its images yet')


def anyres_spec(config: ml_collections.ConfigDict,
                vlm_config: VLMConfig) -> anyres.AnyresSpec | None:
  """How examples tile images for an anyres model (None for a single-view one).

  `data.max_views` (0: every image at its largest grid) bounds the views per example.
  """
  pinpoints = vlm_config.image_grid_pinpoints
  if not pinpoints:
    return None
  vision, data = vlm_config.vision, config.data
  most_crops = max(anyres.num_crops(pinpoint, vision.image_size) for pinpoint in pinpoints)
  return anyres.AnyresSpec(
      pinpoints=tuple(pinpoints), patch_size=vision.patch_size,
      max_crops=vlm_config.anyres_max_crops,
      max_views=data.max_views or data.max_images * (1 + most_crops))


def example_spec(run: Run) -> examples_lib.ExampleSpec:
  """How the run turns records into examples: tokenizer, image preprocessing, sizes."""
  vision, data = run.vlm_config.vision, run.config.data
  return examples_lib.ExampleSpec(
      tokenizer=run.tokenizer, image_size=vision.image_size, image_mean=tuple(vision.image_mean),
      image_std=tuple(vision.image_std), num_image_tokens=vision.num_image_tokens,
      seq_len=data.seq_len, max_images=data.max_images,
      anyres=anyres_spec(run.config, run.vlm_config))


def local_batch_size(run: Run) -> int:
  """This process's rows of the global batch."""
  global_size = run.config.data.batch_size
  if global_size % jax.process_count():
    raise UserError(f'config.data.batch_size={global_size} does not split over '
                     f'{jax.process_count()} processes')
  return global_size // jax.process_count()


def train_iterator(run: Run, pairs: bool = False) -> Iterator[dict]:
  """The shuffled, repeating, checkpointable iterator over this process's training batches
  (of preference pairs with `pairs`, see `objectives.Objective.pairs`)."""
  data, spec = run.config.data, example_spec(run)
  if data.worker_count > 0:
    console.say(f'data: {data.worker_count} Grain worker process(es) decode and preprocess '
                f'images, {data.worker_buffer_size} example(s) ahead each')
  return pipeline.make_iterator(
      run.train_files, batch_size=local_batch_size(run), shuffle=True, seed=data.shuffle_seed,
      num_epochs=None, worker_count=data.worker_count,
      worker_buffer_size=data.worker_buffer_size, weights=tuple(data.train_weights),
      tokenizer=spec.tokenizer,
      image_size=spec.image_size, image_mean=spec.image_mean, image_std=spec.image_std,
      num_image_tokens=spec.num_image_tokens, seq_len=spec.seq_len, max_images=spec.max_images,
      on_bad_record=data.on_bad_record, decode_images=data.decode_images,
      shard_index=jax.process_index(), shard_count=jax.process_count(),
      packing=data.packing, pack_max_images=data.pack_max_images, pairs=pairs,
      anyres=spec.anyres)


def load_eval_set(run: Run, files: Sequence[str] | None = None,
                  check: Callable[..., None] | None = None,
                  pairs: bool = False) -> evaluate.EvalSet:
  """The run's eval records (or `files`), validated once under `data.on_bad_record`, as
  conversations or (`pairs`) as preference pairs, unless `check` says otherwise."""
  return evaluate.load_eval_set(run.eval_files if files is None else files, example_spec(run),
                                on_bad_record=run.config.data.on_bad_record,
                                check=check or pipeline.check_for(pairs))


def check_objective_fits(run: Run, objective: objectives.Objective) -> None:
  """An objective trained on rollouts (GRPO) needs one example per row (no packing)."""
  if objective.rollouts is not None and run.config.data.packing:
    raise UserError(f'config.objective.name={objective.name!r} samples answers to one prompt '
                    'per row; set config.data.packing=False')


def only_adapters_train(run: Run, layout: 'StateLayout') -> bool:
  """LoRA is on and nothing but its adapters trains: the params with the adapters switched off
  are then the starting model at every step."""
  if run.vlm_config.lora is None:
    return False
  params = nn.unbox(state_lib.abstract_boxed_params(run.model, layout.example_inputs))
  return not any(trains and getattr(path[-1], 'key', None) not in lora_lib.LORA_PARAMS
                 for path, trains in jax.tree_util.tree_leaves_with_path(layout.trainable(params)))


def reference_params(run: Run, objective: objectives.Objective,
                     layout: 'StateLayout') -> Optional[Any]:
  """The frozen starting params an objective's reference reads (DPO; GRPO with beta > 0), or
  None when it reads none or the adapters switched off are the starting model (LoRA with only
  adapters training: no second copy in memory).

  The copy is what the run starts from, also when it resumes: the `model.init_from` /
  stage-1 weights, or the seed's initialisation.
  """
  if not objective.reference or only_adapters_train(run, layout):
    return None
  params = pretrained_params(run, layout.shardings.params)
  if params is None:  # from scratch: the train state's own initialisation
    init = lambda key: nn.unbox(run.model.init(key, **layout.example_inputs)['params'])
    params = jax.jit(init, out_shardings=layout.shardings.params)(jax.random.key(run.config.seed))
  count = sum(leaf.size for leaf in jax.tree.leaves(params))
  console.say(f'reference: a frozen copy of the starting params ({count / 1e6:.2f}M parameters)')
  return params


def make_evaluator(run: Run, eval_set: evaluate.EvalSet, objective: objectives.Objective,
                   param_shardings: Any, reference: Any = None) -> evaluate.Evaluator:
  """The run's evaluator over `eval_set`: one eval step and one generate function. A GRPO
  run is evaluated with SFT's metrics (`objectives.for_evaluation`); `reference` is the
  frozen starting params of `reference_params`, if any."""
  config = run.config
  return evaluate.Evaluator(
      model=run.model, objective=objectives.for_evaluation(objective), eval_set=eval_set,
      mesh=run.mesh, reference_params=reference,
      rules=config.logical_axis_rules, param_shardings=param_shardings,
      local_batch_size=local_batch_size(run),
      sampling=inference.sampling_from_config(config.predict, run.tokenizer),
      generate_batch_size=config.predict.batch_size, seed=config.seed)


def example_inputs(run: Run) -> dict:
  """Zero inputs of the right shapes and dtypes for `model.init`."""
  seq_len = run.config.data.seq_len
  images = examples_lib.empty_image_inputs(example_spec(run))  # images (and anyres layout)
  return dict(
      input_ids=np.zeros((1, seq_len), np.int32),
      positions=np.zeros((1, seq_len), np.int32),
      attention_mask=np.ones((1, seq_len), np.int32),
      **{key: value[None] for key, value in images.items()},
  )


def pretrained_params(run: Run, param_shardings: Any) -> Optional[Any]:
  """Parameters imported from Hugging Face folders, placed with their shardings; or None."""
  model = run.config.model
  vlm_config, runtime = run.vlm_config, config_lib.runtime_fields(model)
  if vlm_config.lora is not None:
    # Float weights first (unplaced), then adapters added and LoRA targets quantized.
    float_params = pretrained_params(
        dataclasses.replace(run, vlm_config=dataclasses.replace(vlm_config, lora=None)), None)
    if float_params is None:
      return None
    abstract = nn.unbox(state_lib.abstract_boxed_params(run.model, example_inputs(run)))
    params = lora_lib.adapt_params(float_params, abstract, vlm_config.lora,
                                   jax.random.key(run.config.seed + 1))
    return jax.device_put(params, param_shardings)
  return MODEL_SOURCES[config_lib.model_source(model)].params(run, param_shardings, runtime)


def close(run: Run, iterator: Any) -> None:
  """Stops worker processes of a data iterator, if it has any."""
  del run
  if hasattr(iterator, 'close'):
    iterator.close()


@dataclasses.dataclass
class StateLayout:
  """How a run's train state is made: what trains, the optimizer, and every leaf's sharding.

  Training, resuming and the restore of eval/predict/export must agree on all of it, or a
  saved state no longer fits (e.g. a LoRA run's masked optimizer state).
  """

  trainable: Any  # params -> tree of bools
  optimizer: Any
  schedule: Any
  example_inputs: dict
  shardings: state_lib.TrainState

  def abstract_state(self, model: VLM) -> state_lib.TrainState:
    """ShapeDtypeStructs of the train state, carrying the shardings (restore targets)."""
    shapes = jax.eval_shape(lambda: state_lib.create_train_state(
        model, self.optimizer, self.example_inputs, self.shardings, jax.random.key(0)))
    return checkpoint.abstract_like(shapes, self.shardings)


def state_layout(run: Run) -> StateLayout:
  """The run's trainable mask, optimizer, schedule and train-state shardings."""
  config = run.config
  trainable = optimizer_lib.trainable_fn(config.trainable, lora_on=bool(config.lora.rank))
  # The schedule counts optimizer updates: several per step with GRPO's num_updates, warmup too.
  updates_per_step = objectives.updates_per_step(config.objective)
  optimizer_config = config.optimizer
  if updates_per_step > 1:
    optimizer_config = ml_collections.ConfigDict(config.optimizer.to_dict())
    optimizer_config.warmup_steps = config.optimizer.warmup_steps * updates_per_step
  optimizer, schedule = optimizer_lib.make_optimizer(
      optimizer_config, config.training.num_steps * updates_per_step, trainable)
  inputs = example_inputs(run)
  shardings = state_lib.state_shardings(run.model, optimizer, inputs, run.mesh,
                                        config.logical_axis_rules)
  return StateLayout(trainable=trainable, optimizer=optimizer, schedule=schedule,
                     example_inputs=inputs, shardings=shardings)


def make_rollout_maker(run: Run, objective: objectives.Objective) -> rollout.RolloutMaker | None:
  """The run's sampler of on-policy batches, for an objective trained on rollouts (GRPO)."""
  if objective.rollouts is None:
    return None
  config = run.config
  check_images_are_single_view(config, run.vlm_config, "GRPO's rollout sampler")
  return rollout.RolloutMaker(model=run.model, rollouts=objective.rollouts,
                              tokenizer=run.tokenizer, mesh=run.mesh,
                              rules=config.logical_axis_rules, seq_len=config.data.seq_len,
                              seed=config.seed)
