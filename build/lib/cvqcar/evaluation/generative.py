"""Scores of generated images as the field reports them: FID, sFID,
Inception Score and improved precision/recall, the ADM evaluator's four.

`extract` streams an image set through the FID Inception on a mesh of every
device of every process: global batches of `batch_size` rows, process p
reading its contiguous share of each, a short last batch padded and masked.
Every matmul runs in float32 at `Precision.HIGHEST`. Each batch's pool and
spatial features are gathered on every process in set order and added to
the Frechet statistics in float64 on the host (float32 sums of x x^T lose
the covariance's small eigenvalues to cancellation: a set against itself
would score -1e-3); the Inception Score's per-split sums are reduced on
device. Only the pool features are kept (precision/recall compares every
sample with every reference image). So one process or many, on any
backend, score the same numbers.

The formulas are the ADM evaluator's (guided-diffusion, evaluations/):
- FID / sFID: Frechet distance of pool / spatial feature statistics;
- Inception Score: exp(E_x KL(p(y|x) || p(y))) over `splits` contiguous
  splits, p from the bias-free logits, averaged (and the standard deviation
  over splits); the splits take the set in torch-fidelity's fixed shuffled
  order by default (`split_positions`), or in its own order as ADM's does;
- precision / recall (Kynkaanniemi et al. 2019): the share of samples
  within the k-th nearest-neighbour ball of some reference image, and of
  reference images within that of some sample (k = 3, pool features).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from cvqcar import logs, sharding
from cvqcar.evaluation import fid, image_sets, inception

_HIGHEST = jax.lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class FeatureNetwork:
  """A network whose outputs the scores read: `apply(params, images [B, H,
  W, 3] in [-1, 1])` gives {'pool' [B, D], and optionally 'spatial' [B, S]
  (sFID) and 'logits' [B, classes] (Inception Score; with
  `predicts_labels`, also the accuracy on labelled samples)}."""

  name: str  # in words, for the protocol
  params: Any  # a pytree, passed to apply as a jit argument
  apply: Callable[[Any, jax.Array], dict[str, jax.Array]]
  predicts_labels: bool = False
  image_size: tuple[int, int] | None = None  # what it was trained on


def inception_network(path: str) -> FeatureNetwork:
  """The FID Inception from local weights (see inception.load)."""
  return FeatureNetwork(
      "FID InceptionV3 (pytorch-fid's pt_inception-2015-12-05 weights),"
      f" read from {os.path.basename(path)}", inception.load(path),
      inception.outputs)


@dataclasses.dataclass
class SetFeatures:
  """What the scores need of one image set."""

  pool: fid.FeatureStats  # Frechet statistics sums, pool features
  spatial: fid.FeatureStats | None  # and spatial features, if any
  pool_features: np.ndarray  # [N, D] float32, set order
  is_sums: dict[str, np.ndarray]  # per split: 'p' [S, classes], 'entropy', 'n'
  image_size: tuple[int, int]
  skipped_corrupt: int
  resized: int
  correct: int | None = None  # samples given their label, if labelled

  @property
  def count(self) -> int:
    return len(self.pool_features)


# torch-fidelity's default order for the Inception Score's splits.
SHUFFLE_SEED = 2020


def split_positions(n: int, shuffle_seed: int | None) -> np.ndarray:
  """Each row's position in the order the Inception Score splits: the set's
  own order (None: the ADM evaluator's), or torch-fidelity's permutation
  (numpy RandomState(seed).permutation(n)), which class-ordered batches
  (generate_benchmark writes class by class) need: split by set order, each
  split would hold one class, and the score would read low."""
  if shuffle_seed is None:
    return np.arange(n)
  position = np.empty(n, np.int64)
  position[np.random.RandomState(shuffle_seed).permutation(n)] = np.arange(n)
  return position


def _split_of(positions: np.ndarray, n: int, splits: int) -> np.ndarray:
  """The Inception Score split of each position: split s holds positions
  [s * n // splits, (s + 1) * n // splits), as torch-fidelity chunks."""
  bounds = np.array([s * n // splits for s in range(splits + 1)])
  return np.clip(np.searchsorted(bounds, positions, side="right") - 1, 0,
                 splits - 1).astype(np.int32)


def _batch_outputs(params, images_u8, mask, split, *, splits: int,
                   apply=inception.outputs):
  """One global batch: its features (pool, spatial if any, and the
  predicted class if logits), and the masked Inception Score sums of each
  split."""
  x = images_u8.astype(jnp.float32) / 127.5 - 1
  out = apply(params, x)
  features = {k: out[k] for k in ("pool", "spatial") if k in out}
  sums = {}
  if "logits" in out:
    log_p = jax.nn.log_softmax(out["logits"].astype(jnp.float32), axis=-1)
    p = jnp.exp(log_p)
    features["predicted"] = jnp.argmax(log_p, axis=-1)
    zeros = jnp.zeros((splits,), jnp.float32)
    sums["is"] = {
        # a scatter-add over rows: a reduction, no matmul to pin
        "p": jnp.zeros((splits, p.shape[1]), jnp.float32).at[split].add(
            mask[:, None] * p),
        "entropy": zeros.at[split].add(mask * jnp.sum(p * log_p, axis=-1)),
        "n": zeros.at[split].add(mask)}
  return features, sums


def _first_size(image_set, limit: int = 64) -> tuple[int, int]:
  for start in range(0, min(len(image_set), limit), 8):
    for image in image_set.read(start, start + 8):
      if image is not None:
        return image.shape[:2]
  raise ValueError(f"none of the first {limit} images decodes")


def extract(image_set, network: FeatureNetwork, *, batch_size: int = 64,
            splits: int = 10, shuffle_seed: int | None = SHUFFLE_SEED,
            num_images: int = 0,
            image_size: tuple[int, int] | None = None, what: str = "features",
            mesh: jax.sharding.Mesh | None = None) -> SetFeatures:
  """Streams `image_set` (see image_sets) through `network`: every process
  opens the same set and reads only its rows. Images of another size than
  `image_size` (default: the network's, else the first image's) are
  resized to it."""
  mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  processes = jax.process_count()
  if batch_size % mesh.devices.size:
    raise ValueError(f"--batch_size={batch_size} is not divisible by the"
                     f" {mesh.devices.size} devices")
  n = min(num_images or len(image_set), len(image_set))
  if n == 0:
    raise ValueError("the image set is empty")
  size = tuple(image_size or network.image_size or _first_size(image_set))
  labels = getattr(image_set, "labels", None)
  local = batch_size // processes
  num_batches = -(-n // batch_size)
  # Padding rows (past n) land in the last split, masked out.
  positions = np.concatenate([split_positions(n, shuffle_seed),
                              np.full(batch_size, n - 1)])
  rep, rows_sharded = sharding.replicated(mesh), sharding.batch_sharded(mesh)
  params = jax.device_put(network.params, rep)
  step = jax.jit(functools.partial(_batch_outputs, splits=splits,
                                   apply=network.apply),
                 out_shardings=(rows_sharded, rep))
  stats: dict[str, fid.FeatureStats] = {}
  is_sums: dict[str, np.ndarray] = {}
  kept, corrupt, resized, real, correct = [], 0, 0, 0.0, 0
  progress = logs.Progress(num_batches, what)
  for b in range(num_batches):
    start = b * batch_size + jax.process_index() * local
    stop = max(start, min(start + local, n))
    images = np.zeros((local,) + size + (3,), np.uint8)
    mask = np.zeros((local,), np.float32)
    for i, image in enumerate(image_set.read(start, stop)):
      if image is None:
        corrupt += 1
        continue
      images[i], was_resized = image_sets.fit(image, size)
      resized += was_resized
      mask[i] = 1
    split = _split_of(positions[start:start + local], n, splits)
    batch = sharding.global_batch(
        {"images": images, "mask": mask, "split": split}, mesh)
    with jax.set_mesh(mesh):
      features, sums = step(params, batch["images"], batch["mask"],
                            batch["split"])
    sums = jax.device_get(sums)
    if processes > 1:
      features, global_mask = multihost_utils.process_allgather(
          (features, batch["mask"]), tiled=True)
    else:
      features, global_mask = jax.device_get((features, batch["mask"]))
    real_rows = np.asarray(global_mask) > 0
    for name in ("pool", "spatial"):
      if name in features:
        x = np.asarray(features[name])[real_rows]
        stats.setdefault(name, fid.FeatureStats(x.shape[1])).add(x)
    for k, v in sums.get("is", {}).items():
      is_sums[k] = is_sums.get(k, 0) + np.asarray(v, np.float64)
    if labels is not None and network.predicts_labels:
      rows = np.arange(b * batch_size, (b + 1) * batch_size)[real_rows]
      correct += int(np.sum(np.asarray(features["predicted"])[real_rows] ==
                            labels[rows]))
    kept.append(np.asarray(features["pool"], np.float32)[real_rows])
    real += float(real_rows.sum())
    progress(b + 1, real)
  if processes > 1:
    corrupt, resized = (int(x) for x in np.sum(
        multihost_utils.process_allgather(np.array([corrupt, resized])),
        axis=0))
  if real == 0:
    raise ValueError("no image of the set could be decoded")
  labelled = labels is not None and network.predicts_labels
  return SetFeatures(stats["pool"], stats.get("spatial"),
                     np.concatenate(kept), is_sums, size, corrupt, resized,
                     correct if labelled else None)


def inception_score(is_sums: dict[str, np.ndarray]) -> tuple[float, float]:
  """(mean, std) over splits of exp(mean_x sum_y p log p - sum_y q log q),
  q the split's mean p: KL(p(y|x) || q) averaged over the split."""
  n = np.asarray(is_sums["n"], np.float64)
  if np.any(n < 1):
    raise ValueError(f"an Inception Score split is empty ({n.astype(int)}"
                     " images per split): score more images or fewer splits")
  q = is_sums["p"] / n[:, None]
  kl = is_sums["entropy"] / n - np.sum(q * np.log(np.maximum(q, 1e-300)), 1)
  scores = np.exp(kl)
  return float(np.mean(scores)), float(np.std(scores))


@functools.partial(jax.jit, static_argnames="k")
def _kth_distances(block, points, points_sq, *, k: int):
  """Squared distance of each block row to its k-th nearest point (the
  row itself, when among the points, is the 0-th)."""
  d = _squared_distances(block, points, points_sq)
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@jax.jit
def _inside_any(block, centres, centres_sq, radii):
  d = _squared_distances(block, centres, centres_sq)
  return jnp.any(d <= radii[None, :], axis=1)


def _squared_distances(a, b, b_sq):
  a_sq = jnp.sum(a * a, axis=1)
  ab = jnp.dot(a, b.T, precision=_HIGHEST)
  return jnp.maximum(a_sq[:, None] - 2 * ab + b_sq[None, :], 0.0)


def _blocks(x: np.ndarray, block: int):
  """(start, padded block) over the rows of x; the last block zero-padded
  so every call has one shape."""
  for start in range(0, len(x), block):
    part = x[start:start + block]
    if len(part) < block:
      part = np.concatenate([part, np.zeros((block - len(part),) +
                                            x.shape[1:], x.dtype)])
    yield start, part


def manifold_radii(features: np.ndarray, k: int = 3,
                   block: int = 1024) -> np.ndarray:
  """Squared k-NN radius of every row of features [N, D] within the set."""
  if len(features) <= k:
    raise ValueError(f"precision/recall with k = {k} needs more than {k}"
                     f" images per set, got {len(features)}")
  points = jnp.asarray(features, jnp.float32)
  points_sq = jnp.sum(points * points, axis=1)
  block = min(block, len(features))
  out = [np.asarray(_kth_distances(part, points, points_sq, k=k))
         for _, part in _blocks(features, block)]
  return np.concatenate(out)[:len(features)]


def inside_manifold(queries: np.ndarray, centres: np.ndarray,
                    radii: np.ndarray, block: int = 1024) -> np.ndarray:
  """Whether each query row lies within the ball of some centre."""
  centres_j = jnp.asarray(centres, jnp.float32)
  centres_sq = jnp.sum(centres_j * centres_j, axis=1)
  radii_j = jnp.asarray(radii, jnp.float32)
  block = min(block, len(queries))
  out = [np.asarray(_inside_any(part, centres_j, centres_sq, radii_j))
         for _, part in _blocks(queries, block)]
  return np.concatenate(out)[:len(queries)]


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3
                     ) -> tuple[float, float]:
  """Improved precision and recall of fake features against real ones."""
  precision = inside_manifold(fake, real, manifold_radii(real, k)).mean()
  recall = inside_manifold(real, fake, manifold_radii(fake, k)).mean()
  return float(precision), float(recall)


@dataclasses.dataclass
class Reference:
  """A reference set: FID statistics, optionally spatial statistics and
  pool features (without them sFID, precision and recall are skipped)."""

  mu: np.ndarray
  sigma: np.ndarray
  mu_s: np.ndarray | None = None
  sigma_s: np.ndarray | None = None
  pool_features: np.ndarray | None = None
  count: int = 0
  source: str = ""
  protocol: dict[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_features(cls, features: SetFeatures, source: str,
                    protocol: dict[str, Any]) -> Reference:
    mu, sigma = features.pool.mu_sigma()
    mu_s, sigma_s = (features.spatial.mu_sigma() if features.spatial
                     else (None, None))
    return cls(mu, sigma, mu_s, sigma_s, features.pool_features,
               features.count, source, protocol)

  def save(self, path: str) -> None:
    """An .npz that pytorch-fid (mu, sigma) and the ADM evaluator (mu,
    sigma, mu_s, sigma_s) read too, with the pool features and the
    protocol (JSON) beside them; written whole or not at all."""
    arrays = {"mu": self.mu, "sigma": self.sigma,
              "count": np.int64(self.count),
              "protocol": np.array(json.dumps(self.protocol, sort_keys=True)),
              "source": np.array(self.source)}
    for name in ("mu_s", "sigma_s", "pool_features"):
      if getattr(self, name) is not None:
        arrays[name] = getattr(self, name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)


def read_reference_npz(path: str) -> tuple[dict[str, np.ndarray], bool]:
  """(the arrays of a reference .npz but its images, whether it holds
  images in arr_0). Takes ours, the ADM evaluator's reference batches
  (arr_0 images, mu/sigma/mu_s/sigma_s) and pytorch-fid's (mu, sigma)."""
  with np.load(path) as f:
    names = set(f.files)
    arrays = {k: f[k] for k in names - {"arr_0", "arr_1"}}
  if "mu" not in arrays and "arr_0" not in names:
    raise ValueError(f"{path} holds {sorted(names)}: no statistics (mu,"
                     " sigma) and no images (arr_0) to compute them from")
  if ("mu" in arrays) != ("sigma" in arrays):
    raise ValueError(f"{path} holds only one of mu and sigma")
  return arrays, "arr_0" in names
