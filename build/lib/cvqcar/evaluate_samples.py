"""Score generated images: FID, sFID, Inception Score, precision/recall.

  python -m cvqcar.evaluate_samples \
      --samples=samples/c2i/samples_50000x256x256x3.npz \
      --ref=VIRTUAL_imagenet256_labeled.npz --inception=inception.npz \
      --out=eval/c2i
  python -m cvqcar.evaluate_samples --make_ref --samples=fashion_mnist:test \
      --inception=inception.npz --ref=eval/refs/fashion_test.npz

--samples is an image set: a folder (recursively, e.g. generate_benchmark's
OUT/<class>/<n>.png), an ADM-style .npz batch (uint8 arr_0), or
'fashion_mnist:SPLIT' / 'tfds:NAME:SPLIT' (local, --data_dir). --ref is a
reference .npz (the ADM evaluator's reference batches with their images and
statistics, pytorch-fid's mu/sigma files, or one this command wrote with
--make_ref) or an image set, whose features are computed on the spot.
--make_ref writes the --samples set's reference .npz to --ref instead of
scoring.

Writes OUT/metrics.json and OUT/metrics.md (a markdown row and the
protocol: network weights, resize, sample count, reference). Scores the
reference cannot support are skipped and named (pytorch-fid's files have no
spatial statistics or features: FID only). Undecodable images are skipped
and counted. Multi-process jobs (jax.distributed) split the reading and
report the same numbers as one process.

The feature network is the FID Inception from local weights (--inception:
pytorch-fid's pt_inception-2015-12-05-6726825d.pth or its .npz from
`python -m cvqcar.convert_weights`; nothing is downloaded), as the field
reports, or a classifier trained here (--classifier: an export of
cvqcar.evaluation.classifier, e.g. the Fashion-MNIST one that
cvqcar.prompt_following trains), whose pooled features and logits stand in
for Inception's (no spatial features: no sFID) and which also scores the
share of labelled samples (an ADM batch's arr_1) it gives their class. A
reference records its network and refuses to be scored with another.
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import distributed, logs
from cvqcar.evaluation import samples_job

_SAMPLES = flags.DEFINE_string("samples", None, "Image set to score (folder,"
                               " .npz batch, fashion_mnist:SPLIT or"
                               " tfds:NAME:SPLIT).")
_REF = flags.DEFINE_string("ref", None, "Reference: .npz (ADM batch,"
                           " pytorch-fid statistics, or --make_ref's) or an"
                           " image set; with --make_ref, the .npz to write.")
_OUT = flags.DEFINE_string("out", "", "Output directory (metrics.json,"
                           " metrics.md).")
_MAKE_REF = flags.DEFINE_bool("make_ref", False, "Write --samples' reference"
                              " .npz to --ref instead of scoring.")
_INCEPTION = flags.DEFINE_string(
    "inception", "", "FID Inception weights: pt_inception-2015-12-05-"
    "6726825d.pth or its .npz (python -m cvqcar.convert_weights).")
_CLASSIFIER = flags.DEFINE_string(
    "classifier", "", "Instead of --inception: a classifier export"
    " (cvqcar.evaluation.classifier) as the feature network.")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "For fashion_mnist: and"
                                " tfds: sets.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch size.")
_NUM = flags.DEFINE_integer("num_images", 0, "Score only the first N images"
                            " of --samples (0: all).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "Resize every image to"
                                   " this square size first (0: the first"
                                   " image's size).")
_SPLITS = flags.DEFINE_integer("splits", 10, "Inception Score splits.")
_SHUFFLE = flags.DEFINE_bool(
    "is_shuffle", True, "Split for the Inception Score in torch-fidelity's"
    " fixed shuffled order (seed 2020), as class-ordered batches need;"
    " false: in the set's own order, as the ADM evaluator does.")
_K = flags.DEFINE_integer("k", 3, "Neighbourhood size of precision/recall.")

def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _MAKE_REF.value and not _OUT.value:
    raise app.UsageError("--out is required unless --make_ref")
  logs.setup()
  distributed.initialize()
  samples_job.evaluate_samples(
      _SAMPLES.value, _REF.value, _OUT.value, _INCEPTION.value,
      classifier_path=_CLASSIFIER.value, make_ref=_MAKE_REF.value,
      batch_size=_BATCH.value, num_images=_NUM.value,
      image_size=_IMAGE_SIZE.value, splits=_SPLITS.value,
      is_shuffle=_SHUFFLE.value, k=_K.value, data_dir=_DATA_DIR.value)
  distributed.finish()


if __name__ == "__main__":
  flags.mark_flags_as_required(["samples", "ref"])
  app.run(main)
