"""Convert webdataset tars or parquet files to ArrayRecord pair shards.

  python -m cvqcar.convert_pairs --input='data/laion/{00000..00009}.tar' \
      --format=webdataset --out=shards/laion
  python -m cvqcar.convert_pairs --input='data/cc3m/*.parquet' \
      --format=parquet --image_column=image --caption_column=caption \
      --out=shards/cc3m
  # Four hosts sharing the work (each runs its own worker_index; without
  # these flags, the processes of a jax.distributed job split it):
  python -m cvqcar.convert_pairs --input='data/laion/*.tar' \
      --format=webdataset --out=shards/laion --worker_index=0 --num_workers=4
  python -m cvqcar.convert_pairs --format=embedded --out=shards/embedded

The input formats and the skip rules are described in cvqcar/data/convert.py.
Shards are committed as they fill; rerun an interrupted conversion with the
same arguments to resume it (cvqcar/data/shard_writer.py).
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import distributed, logs
from cvqcar.data import convert, pairs

flags.DEFINE_string(
    "input", None, "Files: comma list of paths, globs, {000..009} ranges"
    " or directories (not needed for --format=embedded).")
flags.DEFINE_enum("format", None, convert.FORMATS, "Input format.")
flags.DEFINE_string("out", None, "Output directory for the shards.")
flags.DEFINE_string("image_column", "image", "Parquet image column.")
flags.DEFINE_string("caption_column", "caption", "Parquet caption column.")
flags.DEFINE_integer("examples_per_shard", pairs.DEFAULT_EXAMPLES_PER_SHARD,
                     "Examples per output shard.")
flags.DEFINE_integer("worker_index", None, "This worker's index (default:"
                     " the jax.distributed process index, else 0).")
flags.DEFINE_integer("num_workers", None, "Workers sharing the inputs"
                     " (default: the jax.distributed process count, else 1).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  f = flags.FLAGS
  if f.format != "embedded" and not f.input:
    raise app.UsageError(f"--format={f.format} needs --input")
  with distributed.workers(f.worker_index, f.num_workers) as (index, count):
    convert.convert(f.input, f.format, f.out, image_column=f.image_column,
                    caption_column=f.caption_column,
                    examples_per_shard=f.examples_per_shard,
                    worker_index=index, num_workers=count)


if __name__ == "__main__":
  flags.mark_flags_as_required(["format", "out"])
  app.run(main)
