"""Local TFDS datasets as random-access sources; TFRecord ones converted.

Grain reads a TFDS dataset by index (`tfds.data_source`), which needs the
ArrayRecord file format. `tfds build` writes TFRecord by default; such a
dataset is converted once, in place (ArrayRecord shards beside the
TFRecord ones, `dataset_info.json` listing both formats):

  python -m cvqcar.data.tfds_images --data_dir=/path/to/tfds \
      --name=imagenet2012

It shows its progress shard by shard, skips shards already converted (run
it again after an interruption) and works on gs:// data dirs too.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
from typing import Any

from etils import epath

from cvqcar import checkpoint

ARRAY_RECORD = "array_record"


def _builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds  # Heavy import; only TFDS data needs it.

  return tfds.builder(name, data_dir=data_dir or None)


def _random_access(info) -> bool:
  """Whether the dataset is stored in a format Grain reads by index. Read
  from the info proto: for a builder class TFDS ships (imagenet2012),
  `info.available_file_formats()` ignores the alternative formats that
  dataset_info.json lists."""
  from tensorflow_datasets.core import file_adapters  # noqa: PLC0415

  proto = info.as_proto
  stored = {proto.file_format or "tfrecord", *proto.alternative_file_formats}
  return bool(stored & {f.value for f in
                        file_adapters.FileFormat.with_random_access()})


def convert_command(name: str, data_dir: str) -> str:
  return (f"python -m cvqcar.data.tfds_images --data_dir={data_dir}"
          f" --name={name}")


def source(name: str, split: str, data_dir: str) -> Any:
  """TFDS `name`'s `split` in `data_dir` as a random-access source of
  examples with their 'image' still encoded; nothing is downloaded.

  A dataset stored only as TFRecord raises a ValueError naming the
  conversion command.
  """
  import tensorflow_datasets as tfds  # Heavy import; only TFDS data needs it.

  try:
    return tfds.data_source(
        name, split=split, data_dir=data_dir or None, download=False,
        decoders={"image": tfds.decode.SkipDecoding()})
  except NotImplementedError as e:  # TFDS: no random-access file format
    builder = _builder(name, data_dir)
    if _random_access(builder.info):  # converted: read as dataset_info says
      return tfds.builder_from_directory(builder.data_dir).as_data_source(
          split=split, decoders={"image": tfds.decode.SkipDecoding()})
    raise ValueError(
        f"TFDS {name} in {data_dir!r} is stored in a format Grain cannot"
        " read by index (TFRecord, as `tfds build` writes by default);"
        " convert it to ArrayRecord once, in place beside the existing"
        f" files, with `{convert_command(name, data_dir)}`") from e


def _convert_shard(in_path: epath.Path, out_path: epath.Path,
                   in_adapter, out_adapter) -> int:
  """One shard rewritten as ArrayRecord, through a temporary file renamed
  or, on gs://, uploaded whole (ArrayRecord writes local files only), so an
  interrupted run leaves no half shard; its number of examples."""
  count = 0

  def examples():
    nonlocal count
    for record in in_adapter.make_tf_data(os.fspath(in_path)):
      count += 1
      yield count, record.numpy()

  with checkpoint.local_copy_to(out_path) as temp:
    out_adapter.write_examples(temp, examples())
  return count


def convert(name: str, data_dir: str, num_workers: int = 8) -> int:
  """Adds ArrayRecord shards to TFDS `name` in `data_dir` and lists the
  format in its dataset_info.json; the number of shards written (0 when
  it already has a random-access format)."""
  from tensorflow_datasets.core import file_adapters  # noqa: PLC0415

  builder = _builder(name, data_dir)
  if not builder.is_prepared():
    raise ValueError(f"TFDS {name} is not prepared in {data_dir!r}")
  info = builder.info
  if _random_access(info):
    logging.info("%s already has a random-access format (%s)", name,
                 sorted(f.value for f in info.available_file_formats()))
    return 0
  in_adapter = file_adapters.ADAPTER_FOR_FORMAT[info.file_format]
  out_adapter = file_adapters.ADAPTER_FOR_FORMAT[
      file_adapters.FileFormat.ARRAY_RECORD]
  jobs = []
  for split in info.splits.values():
    template = split.filename_template
    out_template = template.replace(filetype_suffix=ARRAY_RECORD)
    for i in range(split.num_shards):
      out = out_template.sharded_filepath(shard_index=i,
                                          num_shards=split.num_shards)
      if not out.exists():
        jobs.append((template.sharded_filepath(
            shard_index=i, num_shards=split.num_shards), out))
  total = sum(split.num_shards for split in info.splits.values())
  logging.info("converting %d of %d shards of %s in %s to ArrayRecord",
               len(jobs), total, name, builder.data_dir)
  done, examples = total - len(jobs), 0
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    futures = [pool.submit(_convert_shard, i, o, in_adapter, out_adapter)
               for i, o in jobs]
    for future in concurrent.futures.as_completed(futures):
      done, examples = done + 1, examples + future.result()
      logging.info("shard %d/%d converted (%d examples so far)", done, total,
                   examples)
  info.add_alternative_file_format(file_adapters.FileFormat.ARRAY_RECORD)
  info.write_to_directory(builder.data_dir, all_metadata=False)
  logging.info("%s in %s now reads as ArrayRecord too", name,
               builder.data_dir)
  return len(jobs)


def main(argv) -> None:
  del argv
  convert(_NAME.value, _DATA_DIR.value, _NUM_WORKERS.value)


if __name__ == "__main__":
  from absl import app, flags

  _DATA_DIR = flags.DEFINE_string("data_dir", None, "The TFDS data dir.",
                                  required=True)
  _NAME = flags.DEFINE_string("name", "imagenet2012", "The TFDS dataset"
                              " (config.data.tfds_name).")
  _NUM_WORKERS = flags.DEFINE_integer("num_workers", 8,
                                      "Shards converted at once.")
  app.run(main)
