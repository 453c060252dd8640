"""The `python -m cvqcar.evaluate` job: a tokenizer export, a data spec
and metric names in; metrics.json and a markdown row out."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import ml_collections

from cvqcar import checkpoint
from cvqcar.data import images as image_data
from cvqcar.tokenizer import evaluate, export


def eval_source(data: str, config: ml_collections.ConfigDict,
                num_images: int = 0, data_dir: str = ""):
  """(records, preprocess, number of images) for a --data spec: 'embedded'
  (crops of the held-out photos), 'folder:DIR' or 'imagenet2012:SPLIT'."""
  r = config.model.resolution
  kind, _, arg = data.partition(":")
  if kind == "embedded":
    num = num_images or config.data.get("num_eval_images", 256)
    return (image_data.embedded_photos("eval"), image_data.Preprocess(
        r, crop="random_scale", min_scale=config.data.min_scale), num)
  if kind == "folder" and arg:
    records = image_data.FolderImages(arg)
  elif kind == "imagenet2012" and arg:
    cfg = ml_collections.ConfigDict({"data_dir": data_dir})
    records = image_data.imagenet_records(cfg, arg)
  else:
    raise ValueError(f"--data={data!r}; expected 'embedded',"
                     " 'folder:DIRECTORY' or 'imagenet2012:SPLIT'")
  num = min(num_images or len(records), len(records))
  return records, image_data.Preprocess(r, crop="center"), num


def evaluate_export(path: str, *, data: str = "embedded",
                    names=evaluate.METRICS, out: str, batch_size: int = 32,
                    num_images: int = 0, data_dir: str = "",
                    inception_path: str = "", lpips_path: str = "",
                    ref_stats: str = "", quantize_uint8: bool = True
                    ) -> dict[str, Any]:
  """The `python -m cvqcar.evaluate` job: metrics of a tokenizer export."""
  unknown = sorted(set(names) - set(evaluate.METRICS))
  if unknown:
    raise ValueError(f"unknown metrics {unknown}; known:"
                     f" {list(evaluate.METRICS)}")
  tokenizer = export.load_tokenizer(path)
  config = checkpoint.load_config(path)
  devices = jax.device_count()
  if batch_size % devices:
    raise ValueError(f"--batch_size={batch_size} is not divisible by the"
                     f" {devices} devices")
  records, preprocess, num = eval_source(data, config, num_images, data_dir)
  weights, graphdef, skipped = evaluate.load_weights(names, inception_path,
                                            lpips_path)
  batches = image_data.padded_eval_batches(
      records, preprocess, batch_size=batch_size, seed=config.seed + 1,
      num_examples=num)
  most = -(-num // jax.process_count())
  num_batches = max(1, -(-most // (batch_size // jax.process_count())))
  logging.info("evaluating %s on %s: %d images, batch %d", path, data, num,
               batch_size)
  result = evaluate.evaluate(tokenizer, config, batches, num_batches, weights,
                    graphdef, ref_stats=ref_stats,
                    quantize_uint8=quantize_uint8)
  for name in ("psnr", "ssim", "usage"):
    if name not in names:
      result.pop(name, None)
  if "usage" not in names:
    result.pop("codebook_usage")
    result.pop("codebook_perplexity")
  result.update(data=data, tokenizer=path, skipped_metrics=skipped)
  print(evaluate.write_results(out, result, os.path.basename(path.rstrip("/"))))
  return result
