"""Pre-tokenize pair shards with a frozen CVQ tokenizer export.

  python -m cvqcar.tokenize_dataset --tokenizer=exports/cvq_tiny \
      --input=shards/embedded --out=shards/embedded_tokens

Writes {'tokens': int32 [C], 'caption'} shards that CAR training reads with
`--config.data.name=shards`; see cvqcar/car/pretokenize.py. Each process
encodes on all its local devices; rerun an interrupted run with the same
arguments to resume it. The input shards are split over hosts by
--worker_index/--num_workers, or, without them, over the processes of a
jax.distributed job (a TPU pod or Slurm allocation JAX detects by itself, or
--coordinator_address/--num_processes/--process_id): run the same command on
every host, like training.
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import distributed, logs
from cvqcar.car import pretokenize
from cvqcar.data import pairs

flags.DEFINE_string("tokenizer", None, "CVQ tokenizer export directory.")
flags.DEFINE_string("input", None, "Image pair shards: a directory or a glob.")
flags.DEFINE_string("out", None, "Output directory for token shards.")
flags.DEFINE_integer("batch_size", 64, "Images per encoder call (rounded up"
                     " to a multiple of the local device count).")
flags.DEFINE_integer("examples_per_shard", pairs.DEFAULT_EXAMPLES_PER_SHARD,
                     "Input records per output shard.")
flags.DEFINE_integer("worker_index", None, "This worker's index (default:"
                     " the jax.distributed process index, else 0).")
flags.DEFINE_integer("num_workers", None, "Workers sharing the input shards"
                     " (default: the jax.distributed process count, else 1).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  f = flags.FLAGS
  with distributed.workers(f.worker_index, f.num_workers) as (index, count):
    pretokenize.tokenize_shards(
        f.tokenizer, f.input, f.out, batch_size=f.batch_size,
        examples_per_shard=f.examples_per_shard, worker_index=index,
        num_workers=count)


if __name__ == "__main__":
  flags.mark_flags_as_required(["tokenizer", "input", "out"])
  app.run(main)
