"""A small CNN classifier that scores whether samples show their prompt.

Trained on real images of a labelled set (e.g. Fashion-MNIST's 60,000), it
labels generated images; the share given the prompt's class is the
prompt-following accuracy, against chance 1 / num_classes. Saved and loaded
as an export directory (config.json + weights) like the other models.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from cvqcar import checkpoint
from cvqcar.evaluation import generative


class Classifier(nnx.Module):
  """Images [B, R, R, 3] in [-1, 1] -> logits [B, num_classes]: two
  stride-2 conv stages, global average pooling, a linear head."""

  def __init__(self, num_classes: int, width: int = 32, *, rngs: nnx.Rngs):
    conv = lambda i, o, s: nnx.Conv(i, o, (3, 3), strides=(s, s),
                                    rngs=rngs)
    self.convs = nnx.List([conv(3, width, 1), conv(width, width, 2),
                           conv(width, 2 * width, 1),
                           conv(2 * width, 2 * width, 2)])
    self.head = nnx.Linear(2 * width, num_classes, rngs=rngs)

  def features(self, images):
    """The pooled last-stage activations [B, 2 * width] the head reads."""
    x = images
    for conv in self.convs:
      x = nnx.relu(conv(x))
    return jnp.mean(x, axis=(1, 2))

  def __call__(self, images):
    return self.head(self.features(images))


def _loss(model, images, labels):
  logits = model(images)
  return optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()


@nnx.jit
def _step(model, optimizer, images, labels):
  loss, grads = nnx.value_and_grad(_loss)(model, images, labels)
  optimizer.update(model, grads)
  return loss


def train(images: np.ndarray, labels: np.ndarray, num_classes: int, *,
          steps: int = 1000, batch_size: int = 128,
          learning_rate: float = 2e-3, width: int = 32, seed: int = 0,
          log_every: int = 200) -> Classifier:
  """Trains on images [N, R, R, 3] in [-1, 1] and labels [N] in
  0..num_classes - 1 with Adam, random batches (and horizontal flips)."""
  images, labels = np.asarray(images, np.float32), np.asarray(labels)
  if images.ndim != 4 or images.shape[0] != labels.shape[0]:
    raise ValueError(f"images {images.shape} and labels {labels.shape};"
                     " expected [N, R, R, 3] and [N]")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels span {labels.min()}..{labels.max()}; expected"
                     f" 0..{num_classes - 1}")
  model = Classifier(num_classes, width, rngs=nnx.Rngs(seed))
  schedule = optax.cosine_decay_schedule(learning_rate, steps)
  optimizer = nnx.Optimizer(model, optax.adam(schedule), wrt=nnx.Param)
  rng = np.random.default_rng(seed)
  t0 = time.time()
  for step in range(1, steps + 1):
    rows = rng.integers(0, len(images), batch_size)
    batch = images[rows]
    flip = rng.random(batch_size) < 0.5
    batch[flip] = batch[flip, :, ::-1]
    loss = _step(model, optimizer, jnp.asarray(batch),
                 jnp.asarray(labels[rows]))
    if step % log_every == 0 or step == steps:
      logging.info("classifier step %d/%d: loss %.4f (%.0fs)", step, steps,
                   float(loss), time.time() - t0)
  return model


def predict(model: Classifier, images, batch_size: int = 512) -> np.ndarray:
  """Class ids [N] of images [N, R, R, 3] in [-1, 1]."""
  forward = nnx.jit(lambda m, x: jnp.argmax(m(x), axis=-1))
  images = np.asarray(images, np.float32)
  return np.concatenate([
      np.asarray(forward(model, jnp.asarray(images[i:i + batch_size])))
      for i in range(0, len(images), batch_size)] or [np.zeros(0, int)])


def accuracy(model: Classifier, images, labels) -> float:
  return float(np.mean(predict(model, images) == np.asarray(labels)))


def save(model: Classifier, out: str, **info) -> str:
  """Writes an export directory; `info` (e.g. class names, test accuracy)
  goes into its config.json."""
  config = ml_collections.ConfigDict({
      "classifier": {"num_classes": model.head.out_features,
                     "width": model.convs[0].out_features},
      "info": info})
  checkpoint.save_export(out, config, {"params": nnx.state(model)})
  return out


def feature_network(path: str) -> generative.FeatureNetwork:
  """The classifier at `path` as evaluate_samples' feature network: its
  pooled features for FID and precision/recall, its logits for the
  Inception Score and the accuracy on labelled samples; every conv and
  matmul at Precision.HIGHEST, images at the resolution it was trained
  on."""
  model, config = load(path)
  graphdef, state = nnx.split(model)

  def apply(state, images):
    model = nnx.merge(graphdef, state)
    with jax.default_matmul_precision("highest"):
      pool = model.features(images)
      return {"pool": pool, "logits": model.head(pool)}

  info = config.info
  resolution = info.get("resolution")
  accuracy = info.get("test_accuracy")
  name = (f"the classifier at {path}" +
          (f" ({100 * accuracy:.1f}% on its real test images)"
           if accuracy is not None else ""))
  return generative.FeatureNetwork(
      name, state, apply, predicts_labels=True,
      image_size=(resolution, resolution) if resolution else None)


def load(path: str) -> tuple[Classifier, ml_collections.ConfigDict]:
  """(classifier, its saved config) from `save`'s directory."""
  config = checkpoint.load_config(path)
  c = config.classifier
  abstract = nnx.eval_shape(
      lambda: Classifier(c.num_classes, c.width, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  restored = checkpoint.restore_export(path, {"params": state})
  return nnx.merge(graphdef, restored["params"]), config
