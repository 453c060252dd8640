"""Tokenizer evaluation: rFID, PSNR, SSIM, LPIPS, codebook usage, from an
export, the way papers report them.

Every image passes through encode -> decode once: batches are sharded over
all devices of all processes, a short last batch is padded and masked (never
dropped), and metric sums are reduced on device, so every process ends with
the same numbers whatever the process count. rFID compares the Inception
statistics of the reconstructions with those of the same real images (or
with reference statistics from an .npz). Channel tokenizers also get the
coarse-to-fine curve: PSNR (and LPIPS) decoding only the first k channels.

rFID follows the published protocol by default (`quantize_uint8`): real and
reconstructed images are rounded to 8 bits, as the image files pytorch-fid
reads hold them, before Inception; off, it scores the float
reconstructions. PSNR, SSIM and LPIPS always score the float images. All
metrics compute in float32 at `Precision.HIGHEST`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from cvqcar import logs, metrics, sharding
from cvqcar.evaluation import fid, inception
from cvqcar.tokenizer import lpips

if TYPE_CHECKING:  # annotations only
  import ml_collections

METRICS = ("rfid", "psnr", "ssim", "lpips", "usage")
# The flag that provides the weights a metric needs.
NEEDS = {"rfid": "--inception", "lpips": "--lpips"}


def to_8bit(images):
  """Images in [-1, 1] rounded as an 8-bit file holds them (the rounding
  of visualize.to_uint8), back in [-1, 1]."""
  levels = jnp.floor((jnp.clip(images.astype(jnp.float32), -1, 1) + 1) *
                     127.5 + 0.5)
  return levels / 127.5 - 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Weights:
  """Frozen networks of the perceptual metrics; None skips the metric."""

  inception: dict | None = None  # folded FID Inception weights
  lpips: nnx.State | None = None  # LPIPS state (arrays, never constants)


def batch_metrics(model, images, mask, weights: Weights, lpips_graphdef,
                  prefixes=(), quantize_uint8: bool = True):
  """Masked sums over one batch: metric sums, the code histogram, the
  Inception statistics sums of real and reconstructed images (rounded to 8
  bits first with `quantize_uint8`), and the decoded images
  (reconstructions, prefix_k: from the first k channels)."""
  out = model(images, train=False)
  recon = out.reconstructions
  perceptual = (None if weights.lpips is None
                else nnx.merge(lpips_graphdef, weights.lpips))
  sums = {"images": jnp.sum(mask),
          "tokens": jnp.sum(mask * jnp.sum(out.index_weight, axis=1)),
          "psnr": jnp.sum(mask * metrics.psnr(recon, images)),
          "ssim": jnp.sum(mask * metrics.ssim(recon, images))}
  if perceptual is not None:
    sums["lpips"] = jnp.sum(mask * perceptual(recon, images))
  if getattr(model, "quantize", None) == "dynamic":  # shares of regions
    levels = model.quantizer.levels
    share = lambda g: jnp.mean(out.region_level == g, axis=1)
    sums["fine_share"] = jnp.sum(mask * share(levels - 1))
    if levels == 3:
      sums["medium_share"] = jnp.sum(mask * share(1))
  decoded = {"reconstructions": recon}
  for k in prefixes:
    # The first k channels' codes (residual VQ: a channel's adjacent).
    first = decoded[f"prefix_{k}"] = model.decode(
        out.indices[:, :k * getattr(model, "codes_per_token", 1)])
    sums[f"psnr_first_{k}"] = jnp.sum(mask * metrics.psnr(first, images))
    if perceptual is not None:
      sums[f"lpips_first_{k}"] = jnp.sum(mask * perceptual(first, images))
  indices = out.indices.reshape(out.indices.shape[0], -1)
  counts = jnp.zeros(out.code_counts.shape, jnp.float32).at[indices].add(
      mask[:, None] * out.index_weight.reshape(indices.shape))
  stats = {}
  if weights.inception is not None:
    for name, x in (("real", images), ("recon", recon)):
      x = to_8bit(x) if quantize_uint8 else x
      stats[name] = fid.feature_sums(inception.features(weights.inception, x),
                                     mask)
  return sums, counts, stats, decoded


def load_weights(names, inception_path: str = "", lpips_path: str = ""
                 ) -> tuple[Weights, Any, dict[str, str]]:
  """(weights, LPIPS graphdef, {skipped metric: why}) for `names`."""
  weights, graphdef, skipped = Weights(), None, {}
  if "rfid" in names:
    if inception_path:
      weights.inception = inception.load(inception_path)
    else:
      skipped["rfid"] = f"pass {NEEDS['rfid']}=PATH (FID Inception weights)"
  if "lpips" in names:
    if lpips_path:
      graphdef, weights.lpips = nnx.split(lpips.load(lpips_path))
    else:
      skipped["lpips"] = f"pass {NEEDS['lpips']}=PATH (LPIPS VGG weights)"
  for name, why in skipped.items():
    logging.warning("metric %s skipped: %s", name, why)
  return weights, graphdef, skipped


def evaluate(tokenizer, config: ml_collections.ConfigDict, batches,
             num_batches: int, weights: Weights, lpips_graphdef=None,
             mesh=None, ref_stats: str = "", quantize_uint8: bool = True
             ) -> dict[str, Any]:
  """Metrics of `tokenizer` over padded, masked `batches` (see
  data.images.padded_eval_batches); config is the export's. rFID scores
  8-bit images with `quantize_uint8` (the published protocol), else the
  float reconstructions."""
  mesh = mesh or jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  channel = config.model.quantize == "channel"
  prefixes = (tuple(metrics.prefix_lengths(config.model.latent_channels))
              if channel else ())
  graphdef, state = nnx.split(tokenizer)
  rep = sharding.replicated(mesh)
  state, weights = jax.device_put((state, weights), rep)

  @jax.jit
  def step(state, weights, images, mask):
    return batch_metrics(nnx.merge(graphdef, state), images, mask, weights,
                         lpips_graphdef, prefixes,
                         quantize_uint8)[:3]  # images dropped

  sums, counts, stats, corrupt = {}, 0.0, {}, 0
  progress = logs.Progress(num_batches, "evaluate")
  for i, local in enumerate(batches):
    corrupt += int(local.pop("corrupt", 0))
    batch = sharding.global_batch(local, mesh)
    with jax.set_mesh(mesh):
      s, c, st = jax.device_get(step(state, weights, batch["image"],
                                     batch["mask"]))
    for k, v in s.items():
      sums[k] = sums.get(k, 0.0) + float(v)
    counts = counts + np.asarray(c, np.float64)
    for name, d in st.items():
      stats.setdefault(name, fid.FeatureStats(inception.FEATURES)).add_sums(
          s["images"], d)
    progress(i + 1, sums["images"])
  if jax.process_count() > 1:
    corrupt = int(np.sum(multihost_utils.process_allgather(
        np.int64(corrupt))))
  n = sums.pop("images", 0.0)
  if n == 0:
    raise ValueError("no image could be evaluated (all corrupt or none)")
  result: dict[str, Any] = {"images": int(round(n)),
                            "skipped_corrupt": corrupt}
  for k, v in sums.items():
    result[k] = v / n
  result["codebook_usage"] = metrics.codebook_usage(counts)
  result["codebook_perplexity"] = metrics.codebook_perplexity(counts)
  result["num_codes"] = int(counts.shape[0])
  if config.model.quantize == "dynamic":
    d = config.model.dynamic
    result["fine_share_target"] = d.fine_fraction
    if d.get("levels", 2) == 3:
      result["medium_share_target"] = d.get("medium_fraction", 0.0)
  if "recon" in stats:
    reference = (fid.load_stats(ref_stats) if ref_stats
                 else stats["real"].mu_sigma())
    result["rfid"] = fid.frechet_distance(*stats["recon"].mu_sigma(),
                                          *reference)
    result["rfid_reference"] = ref_stats or "the same real images"
    result["rfid_protocol"] = "uint8" if quantize_uint8 else "float"
  return result


def write_results(out: str, result: dict[str, Any], name: str) -> str:
  """OUT/metrics.json and OUT/metrics.md (one markdown row, its rFID column
  naming the protocol: 'rFID (uint8)' or 'rFID (float)'); process 0."""
  rfid = (f"rFID ({result['rfid_protocol']})" if "rfid_protocol" in result
          else "rFID")
  cols = [(rfid, "rfid", "{:.2f}"), ("PSNR", "psnr", "{:.2f}"),
          ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
          ("usage %", "codebook_usage", "{:.1%}"),
          ("fine share (target)", "fine_share", "{:.3f}"),
          ("medium share (target)", "medium_share", "{:.3f}"),
          ("perplexity", "codebook_perplexity", "{:.1f}")]
  for share in ("fine_share", "medium_share"):  # DQ-VAE only
    if share not in result:
      cols = [c for c in cols if c[1] != share]
  row = [name, str(result["images"])] + [
      fmt.format(result[key]).rstrip("%") if key in result else "n/a"
      for _, key, fmt in cols]
  for share in ("fine_share", "medium_share"):
    if f"{share}_target" in result and share in result:
      i = 2 + [c[1] for c in cols].index(share)
      row[i] += f" ({result[f'{share}_target']:.2f})"
  header = ["tokenizer", "images"] + [c[0] for c in cols]
  table = ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) +
           "\n| " + " | ".join(row) + " |\n")
  logs.write_metrics(out, result, table)
  return table
