"""Sample images for prompts from a CAR export and a tokenizer export.

  python -m cvqcar.sample --car=exports/car2_tiny \
      --tokenizer=exports/cvq_tiny --prompt="a ginger tabby cat" --out=samples

Writes each image and its coarse-to-fine strip (decoded from the first
C/16, C/8, C/4, C/2 and C channel tokens) as PNGs (and with --save_tokens
its channel tokens as .npy). A sample depends on its seed and prompt
index alone, not on the other prompts.
"""

from __future__ import annotations

from absl import app, flags

from cvqcar import logs
from cvqcar.car import pipeline, sampling

flags.DEFINE_string("car", None, "CAR export directory.")
flags.DEFINE_string("tokenizer", None, "CVQ tokenizer export directory.")
flags.DEFINE_multi_string("prompt", [], "Prompt(s); none: unconditional.")
flags.DEFINE_string("out", None, "Output directory for PNGs.")
flags.DEFINE_float("temperature", 1.0, "0 = greedy.")
flags.DEFINE_integer("top_k", 0, "0 = off.")
flags.DEFINE_float("top_p", 1.0, "1 = off.")
flags.DEFINE_float("cfg_scale", 3.0, "1 = no guidance.")
flags.DEFINE_enum("cfg_schedule", "constant", list(sampling.CFG_SCHEDULES),
                  "Guidance over the C channel steps: cfg_scale at every"
                  " step, or ramped from cfg_scale (first channel) to 1"
                  " (last) linearly or as a half cosine.")
flags.DEFINE_integer("seed", 0, "First seed.")
flags.DEFINE_integer("num_seeds", 1, "Samples per prompt.")
flags.DEFINE_bool("save_tokens", False, "Also write each sample's channel"
                  " tokens as <name>_tokens.npy (int32 [C]).")
flags.DEFINE_bool("truncate", False, "Cut prompts longer than the text"
                  " length to their first ids (else they are refused).")
flags.DEFINE_integer("max_text_len", 0, "Text length; 0: the one the model"
                     " was trained with.")
flags.DEFINE_string("mesh", "", "Sampling mesh, e.g. 'fsdp=4,model=2' (axes"
                    " data, fsdp, model; data takes the devices left over);"
                    " default: this process's devices over data.")
flags.DEFINE_enum("param_dtype", "bfloat16", ["bfloat16", "float32"],
                  "The dtype the weights are read in for sampling.")
flags.DEFINE_bool("allow_tokenizer_mismatch", False, "Sample with a tokenizer"
                  " export other than the one CAR was trained with.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.setup()
  f = flags.FLAGS
  pipeline.sample_to_files(
      f.car, f.tokenizer, f.prompt, f.out, seed=f.seed,
      num_seeds=f.num_seeds, temperature=f.temperature, top_k=f.top_k,
      top_p=f.top_p, cfg_scale=f.cfg_scale, cfg_schedule=f.cfg_schedule,
      truncate=f.truncate, max_text_len=f.max_text_len,
      save_tokens=f.save_tokens, mesh=f.mesh, param_dtype=f.param_dtype,
      allow_tokenizer_mismatch=f.allow_tokenizer_mismatch)


if __name__ == "__main__":
  flags.mark_flags_as_required(["car", "tokenizer", "out"])
  app.run(main)
