"""Train a tiny class-conditional DQ-Transformer on a DQ-VAE's tokens.

  python -m cvqcar.train \
      --config=configs/cvq_tokenizer.py:tiny,budget=64,dynamic \
      --workdir=runs/dq_tiny
  python -m cvqcar.export --workdir=runs/dq_tiny --out=exports/dq_tiny
  python -m cvqcar.train_dq --tokenizer=exports/dq_tiny --out=samples/dq

The embedded photos are the classes: each photo's random crops are encoded
by the DQ-VAE (variable-length coarse-then-fine sequences), a
DQ-Transformer learns them conditioned on the photo's index, and one row of
samples per class is decoded into OUT/samples.png (first column: a real
crop of that photo). OUT/train.json holds the loss curve and the mean
sequence length of data and samples. A toy: one device, no checkpoints.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from cvqcar import logs, visualize
from cvqcar.data import images as image_data
from cvqcar.dq import trainer as dq_trainer
from cvqcar.dq import transformer as dq
from cvqcar.tokenizer import dynamic, export

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "DQ-VAE export.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_CROPS = flags.DEFINE_integer("crops", 64, "Encoded crops per photo.")
_CLASSES = flags.DEFINE_integer("classes", 8, "Photos (classes) to use.")
_SAMPLES = flags.DEFINE_integer("samples", 4, "Samples per class.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "1 = off.")
_CFG = flags.DEFINE_float("cfg_scale", 2.0, "1 = no guidance.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of crops, model and samples.")


def encode_photos(tokenizer, num_classes: int, crops: int, seed: int):
  """Random crops of the first num_classes photos -> (DynamicTokens of all
  crops, class ids, one real crop per class)."""
  photos = image_data.embedded_photos("train")[:num_classes]
  preprocess = image_data.Preprocess(tokenizer.resolution,
                                     crop="random_scale")
  rng = np.random.default_rng(seed)
  encode = jax.jit(tokenizer.encode)
  tokens, labels, firsts = [], [], []
  for label, photo in enumerate(photos):
    images = np.stack([preprocess(photo, rng)["image"] for _ in range(crops)])
    tokens.append(jax.device_get(encode(jnp.asarray(images))))
    labels.append(np.full(crops, label, np.int32))
    firsts.append(images[0])
  joined = dynamic.DynamicTokens(*[np.concatenate(parts) for parts in
                                   zip(*tokens, strict=True)])
  return joined, np.concatenate(labels), np.stack(firsts)


def train_config(tokenizer, num_classes: int, steps: int, seed: int):
  q = tokenizer.quantizer
  return ml_collections.ConfigDict({
      "model": {"grid": q.height, "levels": q.levels,
                "num_codes": tokenizer.num_codes,
                "num_classes": num_classes},
      "optimizer": {"learning_rate": 1e-3, "warmup_steps": min(50, steps // 4),
                    "b1": 0.9, "b2": 0.99, "weight_decay": 0.0,
                    "grad_clip": 1.0},
      "batch_size": 32, "seed": seed, "cond_drop_prob": 0.1,
      "num_train_steps": steps})


def run(tokenizer_dir: str, out: str, *, steps: int, crops: int,
        num_classes: int, samples: int, seed: int = 0, **sampling) -> dict:
  tokenizer = export.load_tokenizer(tokenizer_dir)
  if tokenizer.quantize != "dynamic":
    raise ValueError(f"{tokenizer_dir} is a {tokenizer.quantize!r} tokenizer;"
                     " train_dq needs quantize='dynamic' (a DQ-VAE)")
  tokens, labels, reals = encode_photos(tokenizer, num_classes, crops, seed)
  logging.info("encoded %d crops of %d photos: %.1f codes per image (of"
               " %d..%d)", len(labels), num_classes, tokens.lengths.mean(),
               tokenizer.quantizer.num_regions, tokenizer.num_tokens)
  config = train_config(tokenizer, num_classes, steps, seed)
  model, losses = dq_trainer.train(config, tokens.codes, tokens.positions,
                                   tokens.lengths, labels, steps)
  classes = np.repeat(np.arange(num_classes), samples)
  codes, positions, lengths = dq.generate(
      model, jnp.asarray(classes, jnp.int32), jax.random.key(seed + 2),
      **sampling)
  images = np.asarray(tokenizer.decode(
      dynamic.DynamicTokens(codes, positions, lengths)))
  rows = images.reshape(num_classes, samples, *images.shape[1:])
  grid = visualize.strip_grid(np.concatenate([reals[:, None], rows], 1))
  os.makedirs(out, exist_ok=True)
  visualize.save_png(grid, os.path.join(out, "samples.png"))
  result = {"steps": steps, "first_loss": float(losses[0]),
            "last_loss": float(np.mean(losses[-10:])),
            "data_mean_length": float(tokens.lengths.mean()),
            "sample_mean_length": float(np.mean(lengths)),
            "losses": [float(x) for x in losses]}
  with open(os.path.join(out, "train.json"), "w") as f:
    json.dump(result, f)
  print(f"DQ-Transformer: loss {result['first_loss']:.3f} ->"
        f" {result['last_loss']:.3f} in {steps} steps; codes per image:"
        f" data {result['data_mean_length']:.1f}, samples"
        f" {result['sample_mean_length']:.1f}; grid"
        f" {os.path.join(out, 'samples.png')}", flush=True)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  run(_TOKENIZER.value, _OUT.value, steps=_STEPS.value, crops=_CROPS.value,
      num_classes=_CLASSES.value, samples=_SAMPLES.value, seed=_SEED.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
      cfg_scale=_CFG.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["tokenizer", "out"])
  app.run(main)
