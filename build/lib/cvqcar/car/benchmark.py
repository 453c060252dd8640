"""Text-to-image benchmark images in the layouts their scorers read.

GenEval (`evaluation_metadata.jsonl`, one JSON object per prompt) reads
  OUT/00000/metadata.jsonl   the prompt's JSON line
  OUT/00000/samples/0000.png ... one file per sample
and DPG-Bench (prompts as DIR/<id>.txt, or a .jsonl of {"id", "prompt"}, or
one prompt per line) reads OUT/<id>.png, a 2 x 2 grid of four samples.
Class-conditional ImageNet (imagenet_c2i, a class-conditional CAR: every
class, or the class indices listed one a line) writes OUT/<class>/<n>.png
and, once every class is done, OUT/samples_NxHxWx3.npz (arr_0 uint8
images, arr_1 classes: the ADM evaluator's sample batch, which
`cvqcar.evaluate_samples` scores); sample n of class c is drawn with
`sampling.sample_keys(seed, [c], [n])`.
Beside the images, each prompt's sampled channel tokens, int32
[num_images, C] in sample order: OUT/00000/tokens.npy (GenEval reads only
samples/ and metadata.jsonl), OUT/<class>/tokens.npy and
OUT/tokens/<id>.npy (DPG-Bench's scorer skips the one entry of OUT it
cannot open as an image).

Sample j of prompt i (its 0-based line in the prompt file) is drawn with
`sampling.sample_keys(seed, [i], [j])`: the same image for any batch size
and any number of processes. The model is read onto a mesh
(`sampler.Sampler`): by default each process's devices, and prompt i goes
to process i mod P; a mesh across processes (a model too large for one
host) samples every prompt with all of them. Samples go in fixed-size
batches split over the mesh and are written atomically; finished prompts
are skipped, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import zipfile
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from cvqcar import fingerprint, visualize
from cvqcar.car import sampler as sampler_lib
from cvqcar.car import sampling
from cvqcar.data import text
from cvqcar.tokenizer import export

BENCHMARKS = ("geneval", "dpg", "imagenet_c2i")


def class_prompts(path: str, num_classes: int) -> list[dict[str, Any]]:
  """imagenet_c2i's prompts: every class 0..num_classes-1, or the class
  indices listed in `path` (one a line); a class's index is its id."""
  if num_classes < 1:
    raise ValueError("--benchmark=imagenet_c2i needs a class-conditional CAR"
                     " (config.num_classes > 0, e.g. car_stage2.py:c2i)")
  classes = range(num_classes)
  if path:
    with open(path) as f:
      classes = [int(line) for line in f if line.strip()]
    bad = [c for c in classes if not 0 <= c < num_classes]
    if bad:
      raise ValueError(f"{path}: classes {bad[:5]} outside 0.."
                       f"{num_classes - 1}")
  return [{"id": f"{c:04d}", "prompt": str(c), "index": c} for c in classes]


def read_prompts(path: str, benchmark: str) -> list[dict[str, Any]]:
  """[{'id', 'prompt', 'metadata'}] in file order."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path) if n.endswith(".txt"))
    out = []
    for n in names:
      with open(os.path.join(path, n)) as f:
        out.append({"id": n[:-4], "prompt": f.read().strip()})
    return out
  with open(path) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if path.endswith(".jsonl"):
    out = []
    for i, line in enumerate(lines):
      meta = json.loads(line)
      if "prompt" not in meta:
        raise ValueError(f"{path}:{i + 1} has no 'prompt': {line[:80]}")
      out.append({"id": str(meta.get("id", f"{i:05d}")),
                  "prompt": meta["prompt"], "metadata": meta})
    return out
  return [{"id": f"{i:05d}", "prompt": p} for i, p in enumerate(lines)]


def _outputs(benchmark: str, out: str, index: int, item, num_images: int):
  """The files a finished prompt has, in the order they are written: the
  tokens, then the images (a run killed in between leaves the prompt
  unfinished, and a resumed run redoes it)."""
  if benchmark == "imagenet_c2i":
    folder = os.path.join(out, item["id"])
    return [os.path.join(folder, "tokens.npy")] + [
        os.path.join(folder, f"{j:04d}.png") for j in range(num_images)]
  if benchmark == "geneval":
    folder = os.path.join(out, f"{index:05d}")
    return [os.path.join(folder, "tokens.npy")] + [
        os.path.join(folder, "samples", f"{j:04d}.png")
        for j in range(num_images)] + [
            os.path.join(folder, "metadata.jsonl")]
  return [os.path.join(out, "tokens", f"{item['id']}.npy"),
          os.path.join(out, f"{item['id']}.png")]


def _write_atomic(path: str, write) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  write(tmp)
  os.replace(tmp, path)


def _save_npy(path: str, array) -> None:
  with open(path, "wb") as f:  # a file object: np.save adds no ".npy"
    np.save(f, array)


def _save(benchmark, out, index, item, images, tokens) -> None:
  """images: uint8 [num_images, H, W, 3] of one prompt, tokens: int32
  [num_images, C]."""
  files = _outputs(benchmark, out, index, item, len(images))
  tokens = np.asarray(tokens, np.int32)
  _write_atomic(files[0], lambda p: _save_npy(p, tokens))
  files = files[1:]
  if benchmark == "imagenet_c2i":
    for path, image in zip(files, images, strict=True):
      _write_atomic(path, lambda p, im=image: visualize.save_png(im, p))
    return
  if benchmark == "geneval":
    for path, image in zip(files[:-1], images, strict=True):
      _write_atomic(path, lambda p, im=image: visualize.save_png(im, p))
    meta = item.get("metadata") or {"prompt": item["prompt"]}
    _write_atomic(files[-1], lambda p: open(p, "w").write(  # noqa: SIM115
        json.dumps(meta) + "\n"))
    return
  n = len(images)
  side = int(np.ceil(np.sqrt(n)))
  pad = side * side - n
  tiles = np.concatenate([images, np.zeros((pad,) + images.shape[1:],
                                           np.uint8)])
  h, w = images.shape[1:3]
  grid = tiles.reshape(side, side, h, w, 3).transpose(0, 2, 1, 3, 4)
  _write_atomic(files[0], lambda p: visualize.save_png(
      grid.reshape(side * h, side * w, 3), p))


def _local(tree):
  """A replicated multi-process tree as arrays on this process's first
  device, so each process decodes on its own."""
  return jax.tree.map(lambda x: x if x.is_fully_addressable
                      else x.addressable_data(0), tree)


def _finished(benchmark: str, out: str, items, num_images: int,
              spans_processes: bool) -> np.ndarray:
  """bool [len(items)]: the prompt's files are all written. A mesh across
  processes samples as one: process 0's view decides for all."""
  done = np.array([all(os.path.exists(p) for p in _outputs(
      benchmark, out, i, item, num_images)) for i, item in items])
  if spans_processes and jax.process_count() > 1:
    done = np.asarray(multihost_utils.broadcast_one_to_all(done))
  return done


def generate_benchmark(benchmark: str, prompts_path: str, car_path: str,
                       tokenizer_path: str, out: str, *,
                       num_images: int = 4, batch_size: int = 8,
                       seed: int = 0, temperature: float = 1.0,
                       top_k: int = 0, top_p: float = 1.0,
                       cfg_scale: float = 3.0, cfg_schedule: str = "constant",
                       allow_tokenizer_mismatch: bool = False, mesh: str = "",
                       param_dtype: str = "bfloat16") -> list[str]:
  """Writes the benchmark's images and tokens; returns the ids of prompts
  done now. A tokenizer export other than the one CAR was trained with is
  refused unless `allow_tokenizer_mismatch`.

  The model is read onto --mesh=`mesh` (`sampler.sampling_mesh`) in
  `param_dtype`. A mesh of this process's devices (the default: all of
  them) samples prompt i when i mod P is this process's index; a mesh
  across processes samples every prompt with all of them, and process 0
  writes. A batch of `batch_size` samples is split over the mesh's batch
  axes (rounded up to a multiple of them).
  """
  if benchmark not in BENCHMARKS:
    raise ValueError(f"--benchmark={benchmark!r}; expected one of"
                     f" {BENCHMARKS}")
  fingerprint.check_record(
      car_path, export.tokenizer_record(tokenizer_path), "the CAR export",
      allow=allow_tokenizer_mismatch, opt_out=fingerprint.FLAG_OPT_OUT,
      warn_if_missing=True)
  car = sampler_lib.Sampler.load(car_path, mesh, param_dtype)
  config = car.config
  tokenizer = export.load_tokenizer(
      tokenizer_path,
      expect=ml_collections.ConfigDict({"model": config.tokenizer}))
  text_tok = text.load_text_tokenizer(config.text_tokenizer)
  if benchmark == "imagenet_c2i":
    items = class_prompts(prompts_path, config.get("num_classes", 0))
  else:
    items = read_prompts(prompts_path, benchmark)
  # A prompt's index names its samples' keys: its line, or its class.
  items = [(item.get("index", i), item) for i, item in enumerate(items)]
  spans = car.spans_processes
  groups, group = ((1, 0) if spans else
                   (jax.process_count(), jax.process_index()))
  writes = not spans or jax.process_index() == 0
  finished = _finished(benchmark, out, items, num_images, spans)
  mine = [(k, i, item) for k, (i, item) in enumerate(items)
          if k % groups == group]
  todo = [(i, item) for k, i, item in mine if not finished[k]]
  if car.padded(batch_size) != batch_size:
    logging.info("batch of %d samples rounded up to %d: a multiple of the"
                 " mesh's %d batch ways", batch_size,
                 car.padded(batch_size), car.batch_ways)
    batch_size = car.padded(batch_size)
  logging.info("%s: %d prompts, %d %s, %d to do", benchmark, len(items),
               len(mine), "on this mesh" if spans else "on this process",
               len(todo))
  decode_graphdef, decode_state = nnx.split(tokenizer)
  decode_state = _local(decode_state)
  rows = [(i, item, j) for i, item in todo for j in range(num_images)]
  done, partial = [], {}
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    pad = batch_size - len(chunk)  # one compiled shape
    prompts = [item["prompt"] for _, item, _ in chunk] + [""] * pad
    ids, mask = text.batch_encode(text_tok, prompts, config.max_text_len,
                                  truncate=True)
    # Padding rows get any key: rows never see each other's.
    keys = sampling.sample_keys(seed, [i for i, _, _ in chunk] + [0] * pad,
                                [j for _, _, j in chunk] + [0] * pad)
    tokens = car.tokens(
        ids, mask, keys, temperature=temperature, top_k=top_k, top_p=top_p,
        cfg_scale=cfg_scale, cfg_schedule=cfg_schedule)[:len(chunk)]
    images = [None] * len(chunk)
    if writes:  # on a mesh across processes, process 0 alone
      images = visualize.to_uint8(np.asarray(nnx.merge(
          decode_graphdef, decode_state).decode(tokens)))
    # A prompt's samples may span two batches; save it once all are in.
    for (i, item, _), image, row in zip(chunk, images, tokens,
                                        strict=True):
      partial.setdefault(i, []).append((image, row))
      if len(partial[i]) == num_images:
        samples = partial.pop(i)
        if writes:
          _save(benchmark, out, i, item,
                np.stack([im for im, _ in samples]),
                np.stack([r for _, r in samples]))
        done.append(item["id"])
    if jax.process_index() == 0:
      sys.stderr.write(f"\r{benchmark}: {min(start + batch_size, len(rows))}"
                       f"/{len(rows)} samples")
  if jax.process_index() == 0 and rows:
    sys.stderr.write("\n")
  if benchmark == "imagenet_c2i":
    if jax.process_count() > 1:  # every process's classes are written
      multihost_utils.sync_global_devices("cvqcar imagenet_c2i npz")
    if jax.process_index() == 0:
      write_sample_batch(out, [item for _, item in items], num_images)
  return done


def write_sample_batch(out: str, items, num_images: int) -> str | None:
  """OUT/samples_NxHxWx3.npz, the ADM evaluator's sample batch: arr_0 the
  uint8 images [N, H, W, 3] class by class, arr_1 their classes [N]. Read
  from the PNGs and streamed into the file, so 50,000 images at 256 px
  (9.8 GB) never sit in memory. None (and a warning) while classes are
  missing."""
  files = [(int(item["index"]), p) for item in items
           for p in _outputs("imagenet_c2i", out, 0, item, num_images)[1:]]
  missing = [p for _, p in files if not os.path.exists(p)]
  if missing:
    logging.warning("%d of %d images missing (e.g. %s): no sample batch"
                    " yet; run again to finish", len(missing), len(files),
                    missing[0])
    return None
  h, w = np.asarray(Image.open(files[0][1])).shape[:2]
  path = os.path.join(out, f"samples_{len(files)}x{h}x{w}x3.npz")
  tmp = f"{path}.{os.getpid()}.tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    with zf.open("arr_0.npy", "w", force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {
          "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
          "fortran_order": False, "shape": (len(files), h, w, 3)})
      for _, png in files:
        image = np.asarray(Image.open(png).convert("RGB"), np.uint8)
        if image.shape != (h, w, 3):
          raise ValueError(f"{png} is {image.shape}, the others {(h, w, 3)}")
        f.write(image.tobytes())
    with zf.open("arr_1.npy", "w") as f:
      np.lib.format.write_array(f, np.array([c for c, _ in files], np.int64))
  os.replace(tmp, path)
  print(f"wrote {path} ({len(files)} samples, {len(items)} classes)")
  return path
