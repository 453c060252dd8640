"""Sample a text-to-image benchmark's prompts into its scorer's layout.

  python -m cvqcar.generate_benchmark --benchmark=geneval \
      --prompts=evaluation_metadata.jsonl --car=exports/car2 \
      --tokenizer=exports/cvq --out=geneval_images
  python -m cvqcar.generate_benchmark --benchmark=dpg \
      --prompts=dpg_bench/prompts --car=... --tokenizer=... --out=dpg_images \
      --mesh=fsdp=4,model=2
  python -m cvqcar.generate_benchmark --benchmark=imagenet_c2i \
      --num_images=50 --car=exports/car2_c2i --tokenizer=... --out=c2i

GenEval: OUT/<index>/metadata.jsonl and OUT/<index>/samples/<n>.png;
DPG-Bench: OUT/<id>.png, a 2 x 2 grid; imagenet_c2i (a class-conditional
CAR; --prompts optional: class indices, one a line, default all classes):
OUT/<class>/<n>.png, then OUT/samples_NxHxWx3.npz for the ADM evaluator
and cvqcar.evaluate_samples. The channel tokens go beside them
(OUT/<index>/tokens.npy; OUT/tokens/<id>.npy). Sample n of prompt i
depends on --seed, i and n alone: batch size and process count do not
change it. --mesh spreads the model and each batch over devices (default:
each process's own, with the prompts split over processes); a second run
skips the prompts already written.
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import distributed, logs
from cvqcar.car import benchmark, sampling

_BENCHMARK = flags.DEFINE_enum("benchmark", None, list(benchmark.BENCHMARKS),
                               "Which layout to write.")
_PROMPTS = flags.DEFINE_string(
    "prompts", None, "Prompt file or directory (imagenet_c2i: class indices,"
    " one a line; default every class).")
_CAR = flags.DEFINE_string("car", None, "CAR export.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer export.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_NUM = flags.DEFINE_integer("num_images", 4, "Samples per prompt.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per batch.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Top-k (0: off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1: off).")
_CFG = flags.DEFINE_float("cfg_scale", 3.0, "Classifier-free guidance.")
_SCHEDULE = flags.DEFINE_enum(
    "cfg_schedule", "constant", list(sampling.CFG_SCHEDULES), "Guidance"
    " over the C channel steps: cfg_scale at every step, or ramped from"
    " cfg_scale (first channel) to 1 (last) linearly or as a half cosine.")
_MESH = flags.DEFINE_string(
    "mesh", "", "Sampling mesh, e.g. 'fsdp=4,model=2' (axes data, fsdp,"
    " model; data takes the devices left over): this process's devices, or"
    " all the job's when it needs more; default: this process's devices"
    " over data.")
_PARAM_DTYPE = flags.DEFINE_enum(
    "param_dtype", "bfloat16", ["bfloat16", "float32"], "The dtype the"
    " weights are read in for sampling.")
_ALLOW = flags.DEFINE_bool(
    "allow_tokenizer_mismatch", False, "Sample with a tokenizer export other"
    " than the one CAR was trained with.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  if _BENCHMARK.value != "imagenet_c2i" and not _PROMPTS.value:
    raise app.UsageError(f"--benchmark={_BENCHMARK.value} needs --prompts")
  distributed.initialize()
  done = benchmark.generate_benchmark(
      _BENCHMARK.value, _PROMPTS.value or "", _CAR.value, _TOKENIZER.value,
      _OUT.value, num_images=_NUM.value, batch_size=_BATCH.value,
      seed=_SEED.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
      top_p=_TOP_P.value, cfg_scale=_CFG.value,
      cfg_schedule=_SCHEDULE.value,
      allow_tokenizer_mismatch=_ALLOW.value, mesh=_MESH.value,
      param_dtype=_PARAM_DTYPE.value)
  print(f"wrote {len(done)} prompts to {_OUT.value}")
  distributed.finish()


if __name__ == "__main__":
  flags.mark_flags_as_required(["benchmark", "car", "tokenizer", "out"])
  app.run(main)
