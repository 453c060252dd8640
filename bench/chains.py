"""The documented CPU chains, run as written and timed: each command's wall
time and the numbers it logs, into docs/benchmarks.md.

  python bench/chains.py --chain=quickstart   # the README's quick start
  python bench/chains.py --chain=car          # + the tiny CAR sequence
  python bench/chains.py --chain=car_shards   # docs/car_at_scale.md, tiny
  python bench/chains.py --chain=dq           # DQ-VAE + DQ-Transformer
  python bench/chains.py --chain=fashion      # the Fashion-MNIST chain
  python bench/chains.py --chain=c2i_fashion  # class-conditional variant

Each chain is the exact command list of docs/training.md (car_shards:
docs/car_at_scale.md), run from the
repository root with this interpreter, so the outputs land where the guide
says (runs/, exports/, samples/). A workdir or export a chain would write
that already exists is refused (a rerun would resume a finished run and time
nothing) unless --overwrite removes it first. `car` needs
exports/cvq_tiny from `quickstart`; `c2i_fashion` needs exports/cvq_fashion
from `fashion`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench import report  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PY = "python"

TOKENIZER = (f"{PY} -m cvqcar.train --config=configs/cvq_tokenizer.py:{{}}"
             " --workdir={}")
CHAINS = {
    "quickstart": [
        TOKENIZER.format("tiny", "runs/cvq_tiny"),
    ],
    "car": [
        f"{PY} -m cvqcar.export --workdir=runs/cvq_tiny --out=exports/cvq_tiny",
        f"{PY} -m cvqcar.train --config=configs/car_stage1.py:tiny"
        " --workdir=runs/car1_tiny",
        f"{PY} -m cvqcar.train --config=configs/car_stage2.py:tiny"
        " --workdir=runs/car2_tiny",
        f"{PY} -m cvqcar.export --workdir=runs/car2_tiny"
        " --out=exports/car2_tiny",
        f"{PY} -m cvqcar.sample --car=exports/car2_tiny"
        " --tokenizer=exports/cvq_tiny --prompt='a ginger tabby cat'"
        " --out=samples",
    ],
    # docs/car_at_scale.md's tiny path: pairs -> shards -> token shards ->
    # stage I and II on them -> export -> a sample (needs runs/cvq_tiny).
    "car_shards": [
        f"{PY} -m cvqcar.export --workdir=runs/cvq_tiny --out=exports/cvq_tiny",
        f"{PY} -m cvqcar.convert_pairs --format=embedded --out=shards/embedded",
        f"{PY} -m cvqcar.tokenize_dataset --tokenizer=exports/cvq_tiny"
        " --input=shards/embedded --out=shards/embedded_tokens",
        f"{PY} -m cvqcar.train --config=configs/car_stage1.py:tiny"
        " --workdir=runs/car1_shards --config.data.name=shards"
        " --config.data.shards=shards/embedded_tokens"
        " --config.data.pretokenized=True",
        f"{PY} -m cvqcar.train --config=configs/car_stage2.py:tiny"
        " --workdir=runs/car2_shards --config.init_from=runs/car1_shards"
        " --config.data.name=shards --config.data.shards=shards/embedded_tokens"
        " --config.data.pretokenized=True",
        f"{PY} -m cvqcar.export --workdir=runs/car2_shards"
        " --out=exports/car2_shards",
        f"{PY} -m cvqcar.sample --car=exports/car2_shards"
        " --tokenizer=exports/cvq_tiny --prompt='a ginger tabby cat'"
        " --out=samples/shards",
    ],
    "dq": [
        TOKENIZER.format("tiny,budget=64,dynamic", "runs/dq_tiny"),
        f"{PY} -m cvqcar.export --workdir=runs/dq_tiny --out=exports/dq_tiny",
        f"{PY} -m cvqcar.train --config=configs/dq_transformer.py:tiny"
        " --workdir=runs/dqt_tiny",
    ],
    "fashion": [
        TOKENIZER.format("tiny,fashion", "runs/cvq_fashion"),
        f"{PY} -m cvqcar.export --workdir=runs/cvq_fashion"
        " --out=exports/cvq_fashion",
        f"{PY} -m cvqcar.train --config=configs/car_stage1.py:tiny,fashion"
        " --workdir=runs/car1_fashion",
        f"{PY} -m cvqcar.train --config=configs/car_stage2.py:tiny,fashion"
        " --workdir=runs/car2_fashion",
        f"{PY} -m cvqcar.prompt_following --car=runs/car2_fashion"
        " --tokenizer=exports/cvq_fashion --out=samples/fashion",
    ],
    "c2i_fashion": [
        f"{PY} -m cvqcar.train --config=configs/car_stage1.py:tiny,c2i,fashion"
        " --workdir=runs/car1_c2i_fashion",
        f"{PY} -m cvqcar.train --config=configs/car_stage2.py:tiny,c2i,fashion"
        " --workdir=runs/car2_c2i_fashion",
        f"{PY} -m cvqcar.export --workdir=runs/car2_c2i_fashion"
        " --out=exports/car2_c2i_fashion",
        f"{PY} -m cvqcar.prompt_following --car=exports/car2_c2i_fashion"
        " --tokenizer=exports/cvq_fashion --out=samples/c2i_fashion_score",
    ],
}
# The scalars worth a column, when a run logs them (first and last eval).
EVAL_KEYS = ("eval/psnr", "eval/ssim", "eval/codebook_usage", "eval/loss",
             "eval/sample_tokens", "eval/fine_share")


def outputs(argv: list[str]) -> list[str]:
  """The workdir or export directory a command writes (none for a sampler,
  whose --out only gains files)."""
  if argv[2] == "cvqcar.train":
    return [a.split("=", 1)[1] for a in argv if a.startswith("--workdir=")]
  if argv[2] in ("cvqcar.export", "cvqcar.convert_pairs",
                 "cvqcar.tokenize_dataset"):
    return [a.split("=", 1)[1] for a in argv if a.startswith("--out=")]
  return []


def eval_summary(workdir: str) -> str:
  """'key first -> last' for EVAL_KEYS in workdir/metrics.jsonl."""
  path = os.path.join(ROOT, workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return ""
  seen: dict[str, list[float]] = {}
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      for key in EVAL_KEYS:
        if key in record:
          seen.setdefault(key, []).append(record[key])
  last_step = 0
  with open(path) as f:
    for line in f:
      last_step = max(last_step, json.loads(line).get("step", 0))
  parts = [f"{k[5:]} {v[0]:.4g} -> {v[-1]:.4g}" if len(v) > 1
           else f"{k[5:]} {v[0]:.4g}" for k, v in seen.items()]
  return f"step {last_step}: " + ", ".join(parts)


def prompt_following_summary(out: str) -> str:
  path = os.path.join(ROOT, out, "prompt_following.json")
  if not os.path.exists(path):
    return ""
  with open(path) as f:
    result = json.load(f)
  parts = [f"{k} {v:.3f}" for k, v in result.items() if isinstance(v, float)]
  parts += [f"{k} '{v['template']}' {v['accuracy']:.3f}"
            for k, v in result.items()
            if isinstance(v, dict) and "accuracy" in v]
  return ", ".join(parts)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--chain", required=True, choices=sorted(CHAINS))
  p.add_argument("--overwrite", action="store_true",
                 help="remove the chain's workdirs and exports first")
  p.add_argument("--write", action=argparse.BooleanOptionalAction,
                 default=True, help="write docs/benchmarks.md")
  args = p.parse_args(argv)
  commands = [shlex.split(c) for c in CHAINS[args.chain]]
  existing = [o for c in commands for o in outputs(c)
              if os.path.exists(os.path.join(ROOT, o))]
  if existing and not args.overwrite:
    sys.exit(f"{', '.join(existing)} exist: a rerun would resume them and"
             " time nothing; pass --overwrite to remove them first")
  for o in existing:
    shutil.rmtree(os.path.join(ROOT, o))
  rows, total = [], 0.0
  for argv_ in commands:
    print(f"$ {shlex.join(argv_)}", flush=True)
    t0 = time.time()
    run = subprocess.run([sys.executable, *argv_[1:]], cwd=ROOT)
    seconds = time.time() - t0
    total += seconds
    if run.returncode:
      sys.exit(f"{shlex.join(argv_)} exited {run.returncode}")
    if argv_[2] == "cvqcar.train":
      what = eval_summary(outputs(argv_)[0])
    elif argv_[2] == "cvqcar.prompt_following":
      out = [a.split("=", 1)[1] for a in argv_ if a.startswith("--out=")][0]
      what = prompt_following_summary(out)
    else:
      what = ""
    rows.append([f"`{shlex.join(argv_)}`", f"{seconds / 60:.1f}", what])
    print(f"  {seconds:.0f} s  {what}", flush=True)
  rows.append(["all", f"{total / 60:.1f}", ""])
  table = report.markdown_table(["command", "minutes", "logged"], rows)
  print(table)
  if args.write:
    note = ("The chain's commands as docs/training.md gives them, run one"
            " after another from the repository root; minutes of wall time"
            " each (installs not included), and the first and last eval"
            " numbers each run logged (metrics.jsonl).")
    report.write_section(f"chain: {args.chain}", f"{note}\n\n{table}")


if __name__ == "__main__":
  main()
