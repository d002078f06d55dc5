"""Scalars to the console, TensorBoard and `<workdir>/metrics.jsonl`, from process 0 only."""

import json
import os
from typing import Mapping

import jax
from tensorboardX import SummaryWriter


class MetricLogger:
  """Writes each step's scalars to TensorBoard and one JSON line per (step, split)."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if self.enabled:
      self.writer = SummaryWriter(os.path.join(workdir, 'tensorboard'))
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    """Records `scalars` (already host floats) under `split/name` at `step`."""
    if not self.enabled:
      return
    for name, value in scalars.items():
      self.writer.add_scalar(f'{split}/{name}', value, step)
    self.jsonl.write(json.dumps(dict(step=step, split=split, **scalars)) + '\n')
    self.jsonl.flush()

  def close(self) -> None:
    """Flushes and closes the files."""
    if self.enabled:
      self.writer.close()
      self.jsonl.close()
