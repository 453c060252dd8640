"""Orbax checkpoints holding train state and the Grain iterator together."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from cvqcar import fingerprint

CONFIG_FILE = "config.json"
# The checkpoint item with the global data position (see cvqcar.loop).
POSITION_ITEM = "position"


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tuple(d) if isinstance(d, list) else d}


def config_to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json(indent=2, sort_keys=True)


def load_config(directory: str) -> ml_collections.ConfigDict:
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: not a cvqcar workdir/export")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}): damaged by hand or by"
                     " an older writer; restore it from the run's launch"
                     " config") from None


def write_text(directory: str, name: str, text: str) -> None:
  """Writes DIRECTORY/NAME atomically: readers (other processes resuming
  the same workdir, a later run after a kill) see the old file or the new
  one, never a part of one."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  # A unique temporary name per writer; rename replaces in one step on a
  # POSIX filesystem, and object stores (gs://) publish an object whole.
  # (hosts sharing a directory may have equal pids).
  tmp = directory / f".{name}.{socket.gethostname()}.{os.getpid()}.tmp"
  tmp.write_text(text)
  tmp.replace(directory / name)


@contextlib.contextmanager
def local_copy_to(dest: epath.Path) -> Iterator[str]:
  """A local path to write `dest` through, for writers of local files only
  (safetensors): a temporary file beside it, renamed over it, or for an
  object store one on the local disk, uploaded whole. Readers see the old
  file or the new one."""
  dest.parent.mkdir(parents=True, exist_ok=True)
  stem = f".{dest.name}.{socket.gethostname()}.{os.getpid()}.tmp"
  if "://" not in os.fspath(dest):
    tmp = dest.parent / stem
    yield os.fspath(tmp)
    tmp.replace(dest)
    return
  with tempfile.TemporaryDirectory(prefix="cvqcar-") as staging:
    tmp = os.path.join(staging, stem)
    yield tmp
    with open(tmp, "rb") as src, dest.open("wb") as dst:
      shutil.copyfileobj(src, dst, 1 << 24)


def write_config(directory: str, config: ml_collections.ConfigDict) -> None:
  """Writes DIRECTORY/config.json atomically (see write_text)."""
  write_text(directory, CONFIG_FILE, config_to_json(config))


def check_same_model(saved: ml_collections.ConfigDict,
                     current: ml_collections.ConfigDict, where: str,
                     sections: tuple[str, ...] = ("model",)) -> None:
  """Raises naming every field of `sections` that differs between configs."""
  a, b = {}, {}
  for section in sections:
    for cfg, flat in ((saved, a), (current, b)):
      value = cfg.get(section)
      value = value.to_dict() if hasattr(value, "to_dict") else value
      flat.update(_flatten(value, f"{section}.") if isinstance(value, dict)
                  else {section: value})
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
  if diff:
    details = ", ".join(f"{k}: saved {a.get(k)!r} vs now {b.get(k)!r}"
                        for k in diff)
    raise ValueError(f"the checkpoint in {where} was made with a different"
                     f" model config ({details})")


EXPORT_PARAMS_DIR = "params"
# The portable copy: every array under a "part/path/to/leaf" key, readable
# with any safetensors library (no Orbax, no JAX) next to config.json.
EXPORT_SAFETENSORS = fingerprint.SAFETENSORS


def _flat_leaves(tree: dict[str, Any]) -> list[tuple[str, Any]]:
  """('part/a/b', leaf) for a {part: nnx.State or pytree} dict."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx",
                                                              k))))
             for k in path]
    out.append(("/".join(n for n in names if n != "value"), leaf))
  return out


def _host(x) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def tree_sha256(tree: dict[str, Any]) -> str:
  """The export fingerprint of a {part: pytree} dict (see fingerprint)."""
  return fingerprint.arrays_sha256(
      {name: _host(leaf) for name, leaf in _flat_leaves(tree)})


def save_export(out: str, config: ml_collections.ConfigDict,
                tree: dict[str, Any], overwrite: bool = False) -> str:
  """A params-only export: OUT/config.json, the pytree in OUT/params
  (Orbax), the same arrays in OUT/model.safetensors (portable) and their
  fingerprint in OUT/export.json.

  Writing the same arrays again is allowed; replacing a different export
  needs `overwrite`: what was made with it would no longer match it.
  """
  from safetensors.numpy import save_file  # noqa: PLC0415

  arrays = {name: _host(leaf) for name, leaf in _flat_leaves(tree)}
  sha256 = fingerprint.arrays_sha256(arrays)
  out_path = epath.Path(out)
  if (out_path / CONFIG_FILE).exists():
    old = fingerprint.export_sha256(out)
    if old != sha256:
      held = (f"a {CONFIG_FILE} but no fingerprint (no"
              f" {fingerprint.EXPORT_FILE} or {EXPORT_SAFETENSORS}: a"
              " workdir, an export older than fingerprints, or one cut off"
              " mid-write)" if old is None else
              f"a different export (sha256 {old[:12]}...)")
      if not overwrite:
        raise FileExistsError(
            f"{out} holds {held}, not the one being written (sha256"
            f" {sha256[:12]}...); write to another directory, or replace it"
            " on purpose with overwrite=True (python -m cvqcar.export"
            " --overwrite)")
      logging.warning("replacing %s in %s with sha256 %s...", held, out,
                      sha256[:12])
  if jax.process_count() > 1:  # every process checked before any writes
    multihost_utils.sync_global_devices("cvqcar save_export")
  if jax.process_index() == 0:
    # A write killed midway must leave no stale fingerprint behind.
    for name in (fingerprint.EXPORT_FILE, EXPORT_SAFETENSORS):
      (out_path / name).unlink(missing_ok=True)
  write_config(out, config)
  with ocp.StandardCheckpointer() as saver:
    saver.save(_absolute(os.path.join(out, EXPORT_PARAMS_DIR)), tree,
               force=True)
  if jax.process_index() == 0:
    with local_copy_to(out_path / EXPORT_SAFETENSORS) as tmp:
      save_file(arrays, tmp, metadata={"format": "cvqcar", "sha256": sha256})
    write_text(out, fingerprint.EXPORT_FILE,
               json.dumps({"sha256": sha256}, indent=2))
  return out


def restore_export(path: str, target: Any) -> Any:
  """The pytree of an export, restored onto `target`'s (abstract) leaves.

  Reads OUT/params (Orbax) or, without it, OUT/model.safetensors. Leaves
  without a sharding go to the first device; in a multi-process job they
  are replicated on every device of every process (each process reads the
  export, and keeps a whole copy).
  """
  replicated = jax.sharding.NamedSharding(
      jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
      jax.sharding.PartitionSpec())
  if jax.process_count() == 1:
    replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda x: x if getattr(x, "sharding", None) is not None else
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), target)
  if not epath.Path(path, EXPORT_PARAMS_DIR).exists() and (
      epath.Path(path, EXPORT_SAFETENSORS).exists()):
    return _restore_safetensors(
        os.fspath(epath.Path(path, EXPORT_SAFETENSORS)), target)
  with ocp.StandardCheckpointer() as loader:
    return loader.restore(_absolute(os.path.join(path, EXPORT_PARAMS_DIR)),
                          target)


def _restore_safetensors(file: str, target: Any) -> Any:
  from safetensors.numpy import load_file  # noqa: PLC0415

  with fingerprint.local_file(file) as local:
    arrays = load_file(local)
  names = [name for name, _ in _flat_leaves(target)]
  missing = [n for n in names if n not in arrays]
  if missing:
    raise KeyError(f"{file} lacks {missing[:3]} ({len(missing)} missing)")
  leaves = []
  for name, abstract in _flat_leaves(target):
    value = arrays[name]
    if value.shape != abstract.shape:
      raise ValueError(f"{file}: {name} has shape {value.shape}, expected"
                       f" {abstract.shape}")
    leaves.append(jax.device_put(value.astype(abstract.dtype),
                                 abstract.sharding))
  return jax.tree.unflatten(jax.tree.structure(target), leaves)


def _absolute(path: str) -> str:
  # Orbax wants absolute local paths; URLs (gs://...) stay as they are.
  return path if "://" in path else os.path.abspath(path)


class Checkpointer:
  """Saves {state, data iterator} per step; restores the latest."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict, *,
               read_only: bool = False,
               sections: tuple[str, ...] = ("model",)):
    if "://" not in workdir:  # Orbax wants absolute local paths.
      workdir = os.path.abspath(workdir)
    self.directory = os.path.join(workdir, "checkpoints")
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints, create=not read_only,
            read_only=read_only))
    config_path = epath.Path(workdir) / CONFIG_FILE
    if self.manager.latest_step() is not None and config_path.exists():
      check_same_model(load_config(workdir), config, workdir, sections)
    if jax.process_index() == 0 and not read_only:
      write_config(workdir, config)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: grain.DatasetIterator,
           force: bool = False, position: dict | None = None) -> bool:
    """Starts an async save of `state` and the data iterator (with
    `position`, the loop's record of the global data position, as JSON);
    True when a save was started."""
    items = {"state": ocp.args.StandardSave(state),
             "data": grain.checkpoint.CheckpointSave(data_iter)}
    if position is not None:
      items[POSITION_ITEM] = ocp.args.JsonSave(position)
    saved = self.manager.save(step, args=ocp.args.Composite(**items),
                              force=force)
    if saved:
      logging.info("saving checkpoint at step %d to %s", step,
                   self.directory)
    return saved

  def position(self, step: int) -> dict | None:
    """The data position saved with `step`; None for checkpoints written
    before positions were saved."""
    if not (epath.Path(self.directory) / str(step) / POSITION_ITEM).exists():
      return None
    restored = self.manager.restore(step, args=ocp.args.Composite(
        **{POSITION_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[POSITION_ITEM])

  def restore(self, abstract_state: Any,
              data_iter: grain.DatasetIterator | None = None,
              step: int | None = None) -> Any:
    """Restores state (resharded to `abstract_state`'s shardings) and, when
    given, moves `data_iter` to where it was at that step (the iterator
    must come from the same pipeline on the same number of processes)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("restored checkpoint of step %d from %s", step,
                 self.directory)
    return restored.state

  def restore_data(self, step: int, data_iter: grain.DatasetIterator
                   ) -> None:
    """Moves `data_iter` to where the iterator saved at `step` was."""
    self.manager.restore(step, args=ocp.args.Composite(
        data=grain.checkpoint.CheckpointRestore(data_iter)))

  def wait(self) -> None:
    self.manager.wait_until_finished()
