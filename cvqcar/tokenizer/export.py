"""Export a training checkpoint as a params-only tokenizer, and load one.

  python -m cvqcar.export --workdir=runs/cvq_tiny --out=exports/cvq_tiny

writes OUT/config.json and OUT/params (EMA generator params plus codebook
state), which `load_tokenizer` turns back into a `cvq.Tokenizer` without the
trainer, optimizer or discriminator.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import app, flags, logging
from etils import epath
from flax import nnx

from cvqcar import checkpoint, cvq, logs, sharding, train

PARAMS_DIR = "params"


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the EMA tokenizer of `workdir`'s checkpoint (latest by default)."""
  config = checkpoint.load_config(workdir)
  mesh = sharding.make_mesh(
      _single_device(config), devices=jax.devices()[:1])
  trainer = train.Trainer(config, mesh=mesh)
  ckpt = checkpoint.Checkpointer(workdir, config, read_only=True)
  state = ckpt.restore(trainer.abstract_state, step=step)
  out_path = epath.Path(out)
  out_path.mkdir(parents=True, exist_ok=True)
  (out_path / checkpoint.CONFIG_FILE).write_text(
      checkpoint.config_to_json(config))
  with ocp.StandardCheckpointer() as saver:
    saver.save(os.path.abspath(os.path.join(out, PARAMS_DIR)),
               {"params": state.ema_params, "buffers": state.buffers},
               force=True)
  logging.info("exported step %d of %s to %s", int(state.step), workdir, out)
  return out


def _single_device(config):
  config = ml_collections.ConfigDict(config.to_dict())
  for mesh in (config.mesh, config.get("dcn_mesh") or {}):
    for axis in mesh:
      mesh[axis] = 1
  return config


def load_tokenizer(path: str,
                   expect: ml_collections.ConfigDict | None = None
                   ) -> cvq.Tokenizer:
  """Rebuilds the exported tokenizer. With `expect`, a different model
  config is an error naming the fields that differ."""
  config = checkpoint.load_config(path)
  if expect is not None:
    checkpoint.check_same_model(config, expect, path)
  abstract = nnx.eval_shape(
      lambda: cvq.Tokenizer(config.model, rngs=nnx.Rngs(0)))
  graphdef, params, buffers = nnx.split(abstract, nnx.Param, ...)
  target = {"params": params, "buffers": buffers}
  with ocp.StandardCheckpointer() as loader:
    restored = loader.restore(
        os.path.abspath(os.path.join(path, PARAMS_DIR)), target)
  return nnx.merge(graphdef, restored["params"], restored["buffers"])


def main(argv):
  del argv
  logs.setup()
  f = flags.FLAGS
  export(f.workdir, f.out, f.step)


if __name__ == "__main__":
  # Flags only for the command: other entry points import this module.
  flags.DEFINE_string("workdir", None, "Training workdir to export.")
  flags.DEFINE_string("out", None, "Export directory.")
  flags.DEFINE_integer("step", None, "Checkpoint step (latest if unset).")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
