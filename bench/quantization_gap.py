"""How much a trained tokenizer's lookup loses, per held-out photo.

  python bench/quantization_gap.py --tokenizer=exports/cvq_tiny

For each of the embedded eval photos (cat, coffee cup, gravel), on fresh
random crops: PSNR of the tokenizer's reconstruction, PSNR when the decoder
is fed the encoder's maps unquantized, and the share of the maps' energy the
codewords miss, ||z - e||^2 / ||z||^2. A large miss with a low unquantized
PSNR means each token passes its code's identity and little more. Results go
to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench import report  # noqa: E402
from cvqcar import logs, metrics  # noqa: E402
from cvqcar.data import images as image_data  # noqa: E402
from cvqcar.tokenizer import export  # noqa: E402


def gap(tokenizer, images) -> tuple[float, float, float]:
  """(quantized PSNR, unquantized PSNR, missed energy share) of a batch."""
  z = tokenizer.encoder(images)
  e = tokenizer.quantizer(z).quantized  # forward value: the codewords
  quantized = jnp.mean(metrics.psnr(tokenizer.decoder(e), images))
  unquantized = jnp.mean(metrics.psnr(tokenizer.decoder(z), images))
  missed = jnp.sum(jnp.square(z - e)) / jnp.sum(jnp.square(z))
  return float(quantized), float(unquantized), float(missed)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--tokenizer", required=True, help="an export dir")
  parser.add_argument("--crops", type=int, default=64, help="per photo")
  parser.add_argument("--min_scale", type=float,
                      default=image_data.Preprocess.min_scale)
  parser.add_argument("--no-write", dest="write", action="store_false")
  args = parser.parse_args()
  logs.setup()
  tokenizer = export.load_tokenizer(args.tokenizer)
  if tokenizer.quantize == "dynamic":
    sys.exit("quantization_gap: channel or patch tokenizers only")
  crop = image_data.Preprocess(tokenizer.resolution, crop="random_scale",
                               min_scale=args.min_scale)
  rng = np.random.default_rng(0)
  rows = []
  for record in image_data.embedded_photos("eval"):
    images = jnp.asarray(np.stack(
        [crop(record, rng)["image"] for _ in range(args.crops)]))
    quantized, unquantized, missed = gap(tokenizer, images)
    rows.append([record["name"], f"{quantized:.2f}", f"{unquantized:.2f}",
                 f"{missed:.0%}"])
  table = report.markdown_table(
      ["photo", "PSNR", "PSNR unquantized", "energy the codewords miss"],
      rows)
  print(table)
  if args.write:
    note = (f"`{args.tokenizer}` ({tokenizer.num_tokens} {tokenizer.quantize}"
            f" tokens, K = {tokenizer.num_codes}); {args.crops} random crops"
            " of each held-out photo, seed 0.")
    report.write_section("quantization_gap", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
