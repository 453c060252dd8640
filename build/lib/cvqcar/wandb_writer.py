"""Weights & Biases beside TensorBoard: a clu metric writer for W&B.

With `config.wandb.project` set (off by default), the training loop
(cvqcar.loop) writes every scalar and image it logs to TensorBoard and
`metrics.jsonl` to a W&B run as well, from process 0 only. A resumed job
continues the same W&B run: its id is kept in WORKDIR/wandb_run_id.

  --config.wandb.project=cvq --config.wandb.entity=my-team

`WANDB_MODE=offline` (or `config.wandb.mode='offline'`) writes the run
under the workdir (or $WANDB_DIR) for a later `wandb sync`, as on machines
without internet. `wandb` is optional: it is imported only when asked for.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu.metric_writers import interface
from etils import epath

RUN_ID_FILE = "wandb_run_id"


def _import_wandb():
  try:
    import wandb  # noqa: PLC0415 (optional)
  except ImportError as e:
    raise ImportError(
        "config.wandb.project is set but the wandb package is not"
        " installed: pip install wandb (or the project's 'wandb' extra), or"
        " leave config.wandb.project empty") from e
  return wandb


class WandbWriter(interface.MetricWriter):
  """Mirrors clu writer calls to a W&B run (`wandb.init`'s result)."""

  def __init__(self, run):
    self._run = run
    self._wandb = _import_wandb()

  def write_summaries(self, step: int, values: Mapping[str, Any],
                      metadata: Mapping[str, Any] | None = None):
    scalars = {k: v for k, v in values.items() if np.ndim(v) == 0}
    if scalars:
      self.write_scalars(step, scalars)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._run.log({k: float(v) for k, v in scalars.items()}, step=step)

  def write_images(self, step: int, images: Mapping[str, Any]):
    """Images [N, H, W, C] (uint8 or float in [0, 1]): N W&B images."""
    logged = {}
    for key, batch in images.items():
      batch = np.asarray(batch)
      if batch.dtype != np.uint8:
        batch = np.clip(np.rint(batch * 255), 0, 255).astype(np.uint8)
      logged[key] = [self._wandb.Image(image) for image in batch]
    self._run.log(logged, step=step)

  def write_videos(self, step: int, videos: Mapping[str, Any]):
    self._run.log({k: self._wandb.Video(np.asarray(v)) for k, v in
                   videos.items()}, step=step)

  def write_audios(self, step: int, audios: Mapping[str, Any], *,
                   sample_rate: int):
    self._run.log({k: self._wandb.Audio(np.asarray(v)[0],
                                        sample_rate=sample_rate)
                   for k, v in audios.items()}, step=step)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    self._run.log(dict(texts), step=step)

  def write_histograms(self, step: int, arrays: Mapping[str, Any],
                       num_buckets: Mapping[str, int] | None = None):
    self._run.log({k: self._wandb.Histogram(
        np.asarray(v), num_bins=(num_buckets or {}).get(k, 64))
                   for k, v in arrays.items()}, step=step)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._run.config.update(dict(hparams), allow_val_change=True)

  def flush(self):
    pass

  def close(self):
    self._run.finish()


def create(config, workdir: str, process_index: int) -> WandbWriter | None:
  """A WandbWriter for `config.wandb` on process 0, else None (off, or
  another process)."""
  settings = config.get("wandb") or {}
  if not settings.get("project") or process_index != 0:
    return None
  wandb = _import_wandb()
  id_file = epath.Path(workdir) / RUN_ID_FILE
  run_id = (id_file.read_text().strip() if id_file.exists()
            else uuid.uuid4().hex[:12])
  id_file.parent.mkdir(parents=True, exist_ok=True)
  id_file.write_text(run_id)
  local = "://" not in workdir  # W&B writes its files on a local disk
  directory = os.environ.get("WANDB_DIR") or (
      workdir if local else tempfile.gettempdir())
  run = wandb.init(
      project=settings["project"], entity=settings.get("entity") or None,
      name=settings.get("name") or os.path.basename(workdir.rstrip("/")),
      mode=settings.get("mode") or None, dir=directory, id=run_id,
      resume="allow", config=config.to_dict())
  return WandbWriter(run)
