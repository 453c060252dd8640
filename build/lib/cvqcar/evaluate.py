"""Evaluate a tokenizer export: rFID, PSNR, SSIM, LPIPS, codebook usage.

  python -m cvqcar.evaluate --tokenizer=exports/cvq_tiny --out=eval/cvq_tiny
  python -m cvqcar.evaluate --tokenizer=EXPORT \
      --data=imagenet2012:validation --data_dir=/path/to/tfds \
      --metrics=rfid,psnr,ssim,lpips,usage --inception=pt_inception.npz \
      --lpips=lpips_vgg.npz --out=DIR

--data: 'embedded' (crops of the held-out photos, the default),
'folder:DIRECTORY' (every image file in it) or 'imagenet2012:SPLIT' (local
TFDS). Writes DIR/metrics.json and DIR/metrics.md (one markdown row). A
metric whose weights are not given is skipped, naming the flag that enables
it; undecodable images are skipped and counted. Multi-process jobs
(jax.distributed) split the images and report the same numbers.

rFID rounds real and reconstructed images to 8 bits before Inception, as
pytorch-fid scores image files and papers report it; --noquantize_uint8
scores the float reconstructions. metrics.json's rfid_protocol and the
table's rFID column name which ('uint8' or 'float').
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import distributed, logs
from cvqcar.tokenizer import eval_job, evaluate

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer export.")
_DATA = flags.DEFINE_string("data", "embedded", "embedded, folder:DIR or"
                            " imagenet2012:SPLIT.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS directory (imagenet).")
_METRICS = flags.DEFINE_list("metrics", list(evaluate.METRICS),
                             "Metrics to compute.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_NUM = flags.DEFINE_integer("num_images", 0, "Images to evaluate (0: all;"
                            " embedded: the export's eval set size).")
_INCEPTION = flags.DEFINE_string(
    "inception", "", "FID Inception weights: pt_inception-2015-12-05-"
    "6726825d.pth or its .npz (python -m cvqcar.convert_weights).")
_LPIPS = flags.DEFINE_string("lpips", "", "LPIPS VGG weights (.npz).")
_REF = flags.DEFINE_string("ref_stats", "", "rFID reference statistics"
                           " (.npz with mu, sigma); default: the real"
                           " images evaluated.")
_QUANTIZE = flags.DEFINE_bool(
    "quantize_uint8", True, "rFID of images rounded to 8 bits (the published"
    " protocol: pytorch-fid on image files); false: of float"
    " reconstructions.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  distributed.initialize()
  eval_job.evaluate_export(
      _TOKENIZER.value, data=_DATA.value, names=_METRICS.value,
      out=_OUT.value, batch_size=_BATCH.value, num_images=_NUM.value,
      data_dir=_DATA_DIR.value, inception_path=_INCEPTION.value,
      lpips_path=_LPIPS.value, ref_stats=_REF.value,
      quantize_uint8=_QUANTIZE.value)
  distributed.finish()


if __name__ == "__main__":
  flags.mark_flags_as_required(["tokenizer", "out"])
  app.run(main)
