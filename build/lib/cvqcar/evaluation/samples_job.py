"""The `python -m cvqcar.evaluate_samples` job: an image set scored against
a reference (FID, sFID, Inception Score, precision/recall, and a
classifier's accuracy on labelled samples), or a reference written; see
that command for the formats."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np

from cvqcar import logs
from cvqcar.evaluation import classifier, fid, generative, image_sets

METRICS = (("FID", "fid", "{:.3f}"), ("sFID", "sfid", "{:.3f}"),
           ("IS", "inception_score", "{:.2f}"),
           ("Precision", "precision", "{:.4f}"),
           ("Recall", "recall", "{:.4f}"))
# Shown only where computed (labelled samples, a classifier network).
OPTIONAL_METRICS = (("accuracy", "classifier_accuracy", "{:.4f}"),)


def protocol(features: generative.SetFeatures,
             network: generative.FeatureNetwork, splits: int, k: int,
             shuffle: bool = True) -> dict[str, Any]:
  """How a set's features were computed, in words and numbers."""
  h, w = features.image_size
  inception = features.spatial is not None  # the FID Inception's outputs
  out = {
      "network": network.name,
      "input": f"8-bit RGB images at {h} x {w}; {features.resized} of"
               " another size resized to it first (bicubic)",
      "images": features.count,
      "skipped_corrupt": features.skipped_corrupt,
      "fid": f"{'pool_3' if inception else 'pooled'} features"
             f" ({features.pool_features.shape[1]}), Frechet distance in"
             " float64",
      "inception_score": f"{splits} splits of the set in "
                         + ("torch-fidelity's shuffled order (seed"
                            f" {generative.SHUFFLE_SEED})" if shuffle
                            else "its own order (no shuffle)")
                         + ", softmax of the"
                         f" {'bias-free ' if inception else ''}logits",
      "precision_recall": f"k = {k} nearest neighbours on pooled features,"
                          " squared Euclidean distances in float32 at"
                          " Precision.HIGHEST",
  }
  if inception:
    out["resize"] = ("bilinear to 299 x 299, half-pixel centres, no"
                     " antialiasing (pytorch-fid's; the ADM evaluator's TF"
                     " graph resizes with its own bilinear op)")
    out["sfid"] = ("Mixed_6d 1x1 branch, first 7 channels at 17 x 17"
                   " (2023), the ADM evaluator's mixed_6/conv")
  return out


def load_reference(spec: str, features_of, data_dir: str = ""
                   ) -> generative.Reference:
  """A Reference from an .npz or an image set; `features_of(image_set,
  what)` extracts a set's features."""
  if not spec.endswith(".npz"):
    features = features_of(image_sets.open_set(spec, data_dir), "reference")
    return generative.Reference.from_features(features, spec, {})
  arrays, has_images = generative.read_reference_npz(spec)
  if has_images:
    features = features_of(image_sets.NpzSet(spec), "reference")
    ref = generative.Reference.from_features(features, spec, {})
  else:
    ref = generative.Reference(arrays["mu"], arrays["sigma"], source=spec)
  # The file's own statistics win: ADM's reference batches hold them over
  # the whole dataset, beside only 10,000 of its images.
  for name in ("mu", "sigma", "mu_s", "sigma_s"):
    if name in arrays:
      setattr(ref, name, np.float64(arrays[name]))
  if "pool_features" in arrays:
    ref.pool_features = np.asarray(arrays["pool_features"], np.float32)
  if "count" in arrays:
    ref.count = int(arrays["count"])
  if "protocol" in arrays:
    ref.protocol = json.loads(str(arrays["protocol"]))
  return ref


def score(features: generative.SetFeatures, ref: generative.Reference, *,
          k: int = 3) -> tuple[dict[str, float], dict[str, str]]:
  """({metric: value}, {skipped metric: why}) of a sample set against a
  reference."""
  values, skipped = {}, {}
  values["fid"] = fid.frechet_distance(*features.pool.mu_sigma(), ref.mu,
                                       ref.sigma)
  if features.spatial is None:
    skipped["sfid"] = "the feature network has no spatial features"
  elif ref.mu_s is not None:
    values["sfid"] = fid.frechet_distance(*features.spatial.mu_sigma(),
                                          ref.mu_s, ref.sigma_s)
  else:
    skipped["sfid"] = "the reference has no spatial statistics (mu_s)"
  if features.is_sums:
    values["inception_score"], values["inception_score_std"] = (
        generative.inception_score(features.is_sums))
  else:
    skipped["inception_score"] = "the feature network has no logits"
  if features.correct is not None:
    values["classifier_accuracy"] = features.correct / features.count
  if ref.pool_features is not None:
    values["precision"], values["recall"] = generative.precision_recall(
        ref.pool_features, features.pool_features, k)
  else:
    skipped["precision"] = skipped["recall"] = (
        "the reference has no images or pool features")
  return values, skipped


def write_results(out: str, result: dict[str, Any], name: str) -> str:
  """OUT/metrics.json and OUT/metrics.md (a row and the protocol) on
  process 0; returns the markdown."""
  columns = METRICS + tuple(m for m in OPTIONAL_METRICS if m[1] in result)
  header = ["samples", "images"] + [m[0] for m in columns]
  row = [name, str(result["images"])] + [
      fmt.format(result[key]) if key in result else "n/a"
      for _, key, fmt in columns]
  text = ("| " + " | ".join(header) + " |\n|" + "---|" * len(header) +
          "\n| " + " | ".join(row) + " |\n\nProtocol:\n" +
          "".join(f"- {k}: {v}\n" for k, v in result["protocol"].items()) +
          "".join(f"- {k} skipped: {v}\n"
                  for k, v in result["skipped_metrics"].items()))
  logs.write_metrics(out, result, text)
  return text


def feature_network(inception_path: str = "", classifier_path: str = ""
                    ) -> generative.FeatureNetwork:
  """The network of --inception or --classifier (exactly one)."""
  if bool(inception_path) == bool(classifier_path):
    raise ValueError("give exactly one feature network: --inception=FILE"
                     " (the FID Inception) or --classifier=DIR")
  if inception_path:
    return generative.inception_network(inception_path)
  return classifier.feature_network(classifier_path)


def evaluate_samples(samples: str, ref: str, out: str, inception_path: str = "",
                     *, classifier_path: str = "", make_ref: bool = False,
                     batch_size: int = 64, num_images: int = 0,
                     image_size: int = 0, splits: int = 10,
                     is_shuffle: bool = True, k: int = 3, data_dir: str = ""
                     ) -> dict[str, Any]:
  """The command: scores `samples` against `ref` into `out`, or with
  make_ref writes `samples`' reference .npz to `ref`."""
  network = feature_network(inception_path, classifier_path)
  size = (image_size, image_size) if image_size else None

  def features_of(image_set, what, num=0):
    t0 = time.time()
    result = generative.extract(
        image_set, network, batch_size=batch_size, splits=splits,
        shuffle_seed=generative.SHUFFLE_SEED if is_shuffle else None,
        num_images=num, image_size=size, what=what)
    logging.info("%s: %d images in %.1f s (%d undecodable, %d resized)",
                 what, result.count, time.time() - t0,
                 result.skipped_corrupt, result.resized)
    return result

  sample_set = image_sets.open_set(samples, data_dir)
  features = features_of(sample_set, "samples", num_images)
  proto = protocol(features, network, splits, k, is_shuffle)
  if make_ref:
    reference = generative.Reference.from_features(features, samples, proto)
    if jax.process_index() == 0:
      reference.save(ref)
      print(f"wrote {ref}: statistics and pool features of"
            f" {features.count} images of {samples}")
    return {"reference": ref, "images": features.count}
  reference = load_reference(ref, features_of, data_dir)
  made_with = reference.protocol.get("network")
  if made_with and made_with != network.name:
    raise ValueError(f"the reference {ref} was made with {made_with}, not"
                     f" {network.name}: make it again with this network")
  values, skipped = score(features, reference, k=k)
  proto["reference"] = (f"{ref} ({reference.count} images)" if reference.count
                        else ref)
  result = {"samples": samples, "images": features.count, **values,
            "skipped_corrupt": features.skipped_corrupt,
            "skipped_metrics": skipped, "protocol": proto,
            "reference_protocol": reference.protocol}
  name = os.path.basename(samples.rstrip("/")) or samples
  print(write_results(out, result, name))
  return result
