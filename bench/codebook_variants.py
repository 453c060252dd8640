"""Tiny tokenizer side by side: codebook variants and the patch-wise baseline.

  python bench/codebook_variants.py --steps=600

Trains `configs/cvq_tokenizer.py:tiny` at 32 channel tokens of 16 x 16
(SHAPE) once per variant on the embedded
photos (same data, seed and steps) and tabulates the held-out eval metrics:
PSNR, SSIM, codebook usage and perplexity, and for channel-wise models the
PSNR from the first C/16 and C/4 channels. Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import report  # noqa: E402
from configs import cvq_tokenizer  # noqa: E402
from cvqcar import logs  # noqa: E402
from cvqcar.tokenizer import model as tokenizer_lib  # noqa: E402
from cvqcar.tokenizer import trainer as tokenizer_trainer  # noqa: E402

# The shape these rows were measured at (docs/benchmarks.md): 32 channel
# tokens of 16 x 16, before `tiny` moved to 256 tokens of 8 x 8.
SHAPE = {"model.latent_channels": 32, "model.channel_mults": (1, 2),
         "model.num_codes": 1024, "batch_size": 32}
# name -> (config argument, extra overrides on SHAPE)
VARIANTS = {
    "channel, EMA + restart": ("tiny,ema", {}),
    "channel, plain codebook": ("tiny,plain", {}),
    "channel, cosine (EMA)": ("tiny,ema,cosine", {}),
    "channel, SimVQ": ("tiny,simvq", {}),
    "patch f=2, EMA": ("tiny,patch", {}),
    "patch f=4, EMA": ("tiny,patch", {"model.channel_mults": (1, 2, 2)}),
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--only", default="", help="comma-separated names")
  parser.add_argument("--no-write", dest="write", action="store_false")
  args = parser.parse_args()
  logs.setup()
  names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
  header = ["variant", "tokens", "PSNR", "SSIM", "usage", "perplexity",
            "PSNR first C/16", "PSNR first C/4"]
  rows = []
  for name in names:
    arg, overrides = VARIANTS[name]
    config = cvq_tokenizer.get_config(arg)
    config.update_from_flattened_dict({**SHAPE, **overrides})
    config.num_train_steps = args.steps
    config.eval_every = config.checkpoint_every = args.steps
    with tempfile.TemporaryDirectory() as workdir:
      ev = tokenizer_trainer.train_and_evaluate(config, workdir).eval
    c = config.model.latent_channels
    prefix = lambda k: ev.get(f"eval/psnr_first_{k}")
    fmt = lambda v, p=2: "n/a" if v is None else f"{v:.{p}f}"
    rows.append([name, tokenizer_lib.num_tokens(config.model),
                 fmt(ev["eval/psnr"]),
                 fmt(ev["eval/ssim"], 3),
                 f"{ev['eval/codebook_usage']:.1%}",
                 fmt(ev["eval/codebook_perplexity"], 0),
                 fmt(prefix(max(1, c // 16))), fmt(prefix(c // 4))])
    print(report.markdown_table(header, rows[-1:]), flush=True)
  table = report.markdown_table(header, rows)
  print(table)
  if args.write:
    note = (f"`tiny` config (32 px crops of the embedded photos, batch 32,"
            f" K = 1024), {args.steps} steps each, seed 0; eval on 256 fixed"
            " crops of the three held-out photos with the EMA weights. Usage"
            " is the share of the 1024 codes hit on the eval set. Channel"
            " tokens are 16 x 16 maps; patch tokens are 32-d vectors.")
    report.write_section("codebook_variants", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
