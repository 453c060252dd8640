"""Input pipeline throughput: images/s per host core, Grain against tf.data.

  python bench/input_pipeline.py [--images=512] [--seconds=20]

Builds ImageNet-like data locally from the embedded photos: JPEGs with a
long side of 300-500 px and an aspect ratio of 3:4 to 4:3 (quality 90,
random crops of the bundled photographs; ImageNet's average is about
400 x 350, and TFDS stores its encoded JPEGs), written as files,
and ArrayRecord pair shards of the same JPEGs with captions
(cvqcar.data.pairs). Then times, on the same files, the training input of

- the tokenizer (cvqcar.data.images.records_pipeline with Preprocess:
  decode, random crop of the short-side-256 image, flip, float32) with 0, 2
  and 4 Grain worker processes;
- CAR (cvqcar.data.pairs.pair_pipeline: the same image work plus the
  caption's byte-level text ids) with 0, 2 and 4 workers;
- tf.data doing the tokenizer's decode and crop the way big_vision does
  (tf.io.decode_jpeg, resize the short side to 256 bicubic, random_crop,
  random_flip, parallel map with AUTOTUNE).

Per core means per CPU-second: images over the CPU time the process and
its workers used (psutil), so the figure does not depend on how many cores
the machine has. It ends with the cores a host needs to feed its chips: a
256 px tokenizer step's FLOPs per image (launch/compile_check.py's count
for the paper config, passed as --flops_per_image) at 40% of a chip's bf16
peak, over the measured images/s per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import psutil
from absl import flags
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import report  # noqa: E402
from cvqcar.data import images as image_data  # noqa: E402
from cvqcar.data import pairs, text  # noqa: E402

RESOLUTION = 256
# bf16 dense peak per chip (vendor figures): TPU v5p 459 TFLOP/s, H100 SXM
# 989 TFLOP/s; chips per host: a v5p host drives 4, an H100 node 8.
CHIPS = {"TPU v5p (4 a host)": (459e12, 4), "H100 (8 a node)": (989e12, 8)}
MFU = 0.4


def build_jpegs(directory: str, count: int, seed: int = 0) -> list[str]:
  """`count` JPEG files of 300-500 px sides cut from the embedded photos."""
  rng = np.random.default_rng(seed)
  photos = [p["image"] for p in image_data.embedded_photos("train")
            if min(p["image"].shape[:2]) >= 256]
  os.makedirs(directory, exist_ok=True)
  paths = []
  for i in range(count):
    photo = photos[i % len(photos)]
    h, w = photo.shape[:2]
    side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
    top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    long_side = int(rng.integers(300, 501))
    aspect = rng.uniform(0.75, 1.333)
    size = ((long_side, int(long_side / aspect)) if aspect >= 1
            else (int(long_side * aspect), long_side))
    path = os.path.join(directory, f"{i:05d}.jpg")
    crop.resize(size, Image.Resampling.BICUBIC).save(path, quality=90)
    paths.append(path)
  return paths


def cpu_seconds() -> float:
  """User + system CPU time of this process and its live children."""
  me = psutil.Process()
  total = sum(me.cpu_times()[:2])
  for child in me.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.NoSuchProcess:
      pass
  return total


def measure(batches, batch_size: int, seconds: float) -> dict[str, float]:
  """Images/s and images per CPU-second over `seconds` after a warm-up."""
  it = iter(batches)
  for _ in range(3):  # warm-up: workers start, buffers fill
    next(it)
  cpu0, t0, n = cpu_seconds(), time.perf_counter(), 0
  while time.perf_counter() - t0 < seconds:
    batch = next(it)
    n += len(batch["image"]) if isinstance(batch, dict) else batch_size
  wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
  return {"images/s": n / wall, "per core": n / cpu, "cores busy": cpu / wall}


def grain_tokenizer(directory: str, workers: int, batch_size: int):
  return image_data.records_pipeline(
      image_data.FolderImages(directory),
      image_data.Preprocess(RESOLUTION, crop="random", flip=True),
      batch_size=batch_size, seed=0, train=True, num_threads=16,
      worker_count=workers, process_index=0, process_count=1)


def grain_pairs(shard_dir: str, workers: int, batch_size: int):
  return pairs.pair_pipeline(
      pairs.read_source(shard_dir), batch_size=batch_size, seed=0,
      train=True, text_tokenizer=text.load_text_tokenizer("bytes"),
      max_text_len=64, resolution=RESOLUTION, crop="random", flip=True,
      num_threads=16, worker_count=workers)


def tf_tokenizer(paths, batch_size: int, antialias: bool):
  """big_vision's way: decode, resize the short side, random crop, flip.
  `antialias` True is the resampling Preprocess does (PIL's bicubic widens
  its kernel when it shrinks); False, tf.image.resize's default, samples
  4 x 4 source pixels whatever the scale."""
  import tensorflow as tf  # noqa: PLC0415

  def preprocess(path):
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = RESOLUTION / tf.reduce_min(shape)
    size = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), RESOLUTION)
    image = tf.image.resize(image, size, method="bicubic",
                            antialias=antialias)
    image = tf.image.random_crop(image, (RESOLUTION, RESOLUTION, 3))
    image = tf.image.random_flip_left_right(image)
    return {"image": tf.clip_by_value(image, 0, 255) / 127.5 - 1.0}

  ds = tf.data.Dataset.from_tensor_slices(paths).repeat().shuffle(1024)
  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return ds.as_numpy_iterator()


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=512)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--seconds", type=float, default=20.0)
  parser.add_argument("--workers", default="0,2,4")
  parser.add_argument(
      "--flops_per_image", type=float, default=0.0,
      help="the 256 px tokenizer's training FLOPs per image (0: skip the"
      " cores-per-host rows)")
  parser.add_argument("--write", action=argparse.BooleanOptionalAction,
                      default=True, help="write docs/benchmarks.md")
  args = parser.parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # Grain's worker processes read absl flags
  workers = [int(w) for w in args.workers.split(",")]
  with tempfile.TemporaryDirectory() as tmp:
    jpeg_dir = os.path.join(tmp, "jpeg")
    paths = build_jpegs(jpeg_dir, args.images)
    captions = [f"a photograph, crop {i}" for i in range(len(paths))]
    shard_dir = os.path.join(tmp, "pairs")
    pairs.write_shards(({"image": open(p, "rb").read(), "caption": c}
                        for p, c in zip(paths, captions, strict=True)),
                       shard_dir, num_shards=4)
    sizes = [Image.open(p).size for p in paths[:64]]
    print(f"{len(paths)} JPEGs, e.g. {sizes[:4]}; {args.seconds:.0f} s each",
          flush=True)
    rows, best = [], {}
    for name, make in (("tokenizer (Grain)", lambda w: grain_tokenizer(
        jpeg_dir, w, args.batch_size)), ("CAR pairs (Grain)", lambda w:
                                      grain_pairs(shard_dir, w,
                                                  args.batch_size))):
      for w in workers:
        r = measure(make(w), args.batch_size, args.seconds)
        print(name, w, r, flush=True)
        rows.append([name, str(w), f"{r['images/s']:.0f}",
                     f"{r['cores busy']:.2f}", f"{r['per core']:.0f}"])
        best[name] = max(best.get(name, 0.0), r["per core"])
    for antialias in (True, False):
      r = measure(tf_tokenizer(paths, args.batch_size, antialias),
                  args.batch_size, args.seconds)
      name = ("tokenizer (tf.data, antialiased bicubic as Preprocess)"
              if antialias else "tokenizer (tf.data, resize's default:"
              " bicubic without antialiasing)")
      print(name, r, flush=True)
      rows.append([name, "-", f"{r['images/s']:.0f}",
                   f"{r['cores busy']:.2f}", f"{r['per core']:.0f}"])
      best[f"tf.data {antialias}"] = r["per core"]
  ratio = best["tokenizer (Grain)"] / best["tf.data True"]
  plain_ratio = best["tokenizer (Grain)"] / best["tf.data False"]
  table = report.markdown_table(
      ["pipeline", "Grain workers", "images/s", "cores busy",
       "images/s per core"], rows)
  lines = [table, "", "Against tf.data without antialiasing (less work;"
           f" the shrunk image aliases): {plain_ratio:.2f}x.", "",
           f"grain vs tf.data per core: {ratio:.2f}x"]
  if args.flops_per_image:
    need = []
    for chip, (peak, chips) in CHIPS.items():
      images = chips * peak * MFU / args.flops_per_image
      need.append([chip, f"{images:,.0f}",
                   f"{images / best['tokenizer (Grain)']:.1f}"])
    lines += ["", report.markdown_table(
        ["host", f"images/s at {MFU:.0%} MFU", "cores needed (Grain)"],
        need)]
  body = "\n".join(lines)
  print(body)
  if args.write:
    report.write_section("input pipeline", body + "\n\n" + _NOTES.format(
        batch=args.batch_size, images=args.images,
        flops=args.flops_per_image))


_NOTES = """\
Batches of {batch} at 256 px from {images} JPEGs with a long side of 300-500 px
(the embedded photos cut and re-encoded at quality 90). images/s per core is
images over the CPU-seconds of the process and its Grain workers, so it does
not depend on the machine's core count; "cores busy" is how many cores the
pipeline kept busy. The last line compares each pipeline at its best worker
count doing the same work (PIL's bicubic widens its kernel when it shrinks, as
tf.image.resize's antialias=True does). Cores needed: the 256 px tokenizer's
training FLOPs per image ({flops:.3g}; 0 = not given) at 40% of the chips' bf16
peak, over the tokenizer pipeline's best images/s per core. (XLA's count for
the paper config with LPIPS and the discriminator: `python
launch/compile_check.py --config=configs/cvq_tokenizer.py --num_devices=8
--config.batch_size=64` prints it.)

`config.data.worker_count`: Grain's read threads (PIL decodes and resizes
without the GIL) kept 1.8 of 2 cores busy with no worker process, and worker
processes added their own overhead here, so 0 is the setting when a host needs
about 2 cores of input work or less (a TPU v5p host at 40% MFU). A host that
needs more (an 8-GPU H100 node: about 10 cores) should set worker_count to
about the cores needed; this 2-core machine could not measure beyond 4 workers.
"""


if __name__ == "__main__":
  main()
