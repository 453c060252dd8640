"""Tables and plots of finished tokenizer runs, written to docs/results.md.

  python -m cvqcar.report --runs=runs/sweeps --out=docs/results.md

Every directory under --runs that holds a run (config.json and the
metrics.jsonl the trainer writes) is read; runs are grouped by their parent
directory (one sweep, e.g. runs/sweeps/equal_budget/*). For each sweep the
page gets a table (the config fields that vary across its runs, then tokens,
codebook usage, perplexity, PSNR, SSIM, LPIPS and rFID where measured, and
how much PSNR the last quarter of training still added) and PNG plots:
codebook usage against K for each quantization axis and codebook, and PSNR
against the number of kept channels for each nested dropout alpha. Only the
generated blocks of the page are replaced (between `<!-- report:NAME -->`
markers); text written around them stays. Runs still training are listed,
not tabulated. A malformed run directory stops the report with an error
naming the file.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import shlex
import sys
from typing import Any, NamedTuple

from cvqcar import logs

# (column, how to read it from the config, how to print it)
_FIELDS = (
    ("axis", lambda c: c["model"]["quantize"], str),
    ("K", lambda c: c["model"]["num_codes"], lambda v: f"{v:,}"),
    ("quantizer", lambda c: quantizer_name(c["model"]), str),
    ("init scale", lambda c: init_name(c["model"]), str),
    ("alpha", lambda c: c["model"]["nested_dropout_alpha"], str),
    ("DQ-VAE", lambda c: dq_name(c["model"]), str),
    ("batch", lambda c: c["batch_size"], str),
    ("steps", lambda c: c["num_train_steps"], str),
)
_REQUIRED = ("eval/psnr", "eval/ssim", "eval/codebook_usage",
             "eval/codebook_perplexity", "eval/images")


class Run(NamedTuple):
  path: str
  config: dict[str, Any]
  train: dict[int, dict[str, float]]  # step -> train/* scalars
  eval: dict[str, float]  # the final eval's eval/* scalars
  finished: bool
  evals: dict[int, dict[str, float]] = {}  # step -> eval/* scalars, all


def codebook_name(cb: dict[str, Any]) -> str:
  name = ("SimVQ" if cb.get("simvq") else
          "EMA + restart" if cb.get("ema") else "plain")
  return name + (", cosine" if cb.get("cosine") else "")


def dq_name(model: dict[str, Any]) -> str:
  """'learned router, dual coarse, 2 levels, fine 0.50' for a DQ-VAE ('-'
  otherwise); older configs read as what they ran (a pooled coarse map)."""
  if model.get("quantize") != "dynamic":
    return "-"
  d = model.get("dynamic") or {}
  levels = d.get("levels", 2)
  targets = f"fine {d.get('fine_fraction', 0.5):.2f}"
  if levels == 3:
    targets += f", medium {d.get('medium_fraction', 0.0):.2f}"
  return (f"{d.get('router', 'learned')} router, {d.get('encoder', 'pooled')}"
          f" coarse, {levels} levels, {targets}")


def quantizer_name(model: dict[str, Any]) -> str:
  """'EMA + restart', 'plain, rotation', 'FSQ (7,5,5,5,5)', 'RVQ x 4,
  EMA + restart', ...: what quantizes a token, as the tables name it."""
  kind = model.get("quantizer", "vq")
  if kind == "fsq":
    levels = ",".join(str(v) for v in model["scalar"]["fsq_levels"])
    return f"FSQ ({levels})"
  if kind in ("lfq", "bsq"):
    return kind.upper()
  cb = model["codebook"]
  name = codebook_name(cb)
  if cb.get("index_backprop"):
    name = "IBQ"
  if cb.get("rotation"):
    name += ", rotation"
  depth = model.get("rvq_depth", 1)
  return f"RVQ x {depth}, {name}" if depth > 1 else name


def init_name(model: dict[str, Any]) -> str:
  """How the codebook starts: its init scale, 'k-means', or '-' (EMA
  codebooks start from data rows; FSQ, LFQ and BSQ have none)."""
  cb = model["codebook"]
  if model.get("quantizer", "vq") != "vq" or cb["ema"]:
    return "-"
  if cb.get("kmeans_batches"):
    return f"k-means, {cb['kmeans_batches']} batches"
  return str(cb["init_scale"])


def num_tokens(model: dict[str, Any]) -> tuple[int, int]:
  """(codes per image, numbers per token) of a model config: C channel or
  h*w patch tokens, times the residual depth."""
  side = model["resolution"] // 2 ** (len(model["channel_mults"]) - 1)
  depth = model.get("rvq_depth", 1)
  if model["quantize"] == "channel":
    return model["latent_channels"] * depth, side * side
  return side * side * depth, model["latent_channels"]


def bits_per_image(model: dict[str, Any], codes: float) -> float:
  """codes x log2 K: the budget an image's tokens spend."""
  return codes * math.log2(model["num_codes"])


def load_run(path: str) -> Run:
  """A run directory's config and metrics; ValueError naming what is wrong."""
  config_path = os.path.join(path, "config.json")
  metrics_path = os.path.join(path, logs.METRICS_FILE)
  for p in (config_path, metrics_path):
    if not os.path.isfile(p):
      raise ValueError(f"run {path}: no {os.path.basename(p)}")
  try:
    with open(config_path) as f:
      config = json.load(f)
    for _, read, _ in _FIELDS:
      read(config)
    num_tokens(config["model"])
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(f"{config_path}: not a tokenizer config"
                     f" ({type(e).__name__}: {e})") from None
  steps = logs.read_metrics(metrics_path)
  evals = {s: {k: v for k, v in m.items() if k.startswith("eval/")}
           for s, m in steps.items()}
  evals = {s: m for s, m in evals.items() if m}
  if not evals:
    raise ValueError(f"{metrics_path}: no eval metrics")
  last = max(evals)
  missing = [k for k in _REQUIRED if k not in evals[last]]
  if missing:
    raise ValueError(f"{metrics_path}: the eval at step {last} lacks"
                     f" {', '.join(missing)}")
  train = {s: {k: v for k, v in m.items() if k.startswith("train/")}
           for s, m in steps.items()}
  return Run(path, config, {s: m for s, m in train.items() if m},
             evals[last], last >= config["num_train_steps"], evals)


def find_runs(root: str) -> dict[str, list[Run]]:
  """Sweep name (the run's parent directory, relative to root) -> runs."""
  if not os.path.isdir(root):
    raise ValueError(f"no run directory {root!r}")
  sweeps: dict[str, list[Run]] = {}
  for dirpath, dirnames, filenames in sorted(os.walk(root)):
    dirnames.sort()
    if logs.METRICS_FILE in filenames or "config.json" in filenames:
      dirnames.clear()  # checkpoints/ and images/ hold no runs
      parent = os.path.relpath(os.path.dirname(dirpath), root)
      sweep = os.path.basename(root.rstrip("/")) if parent == "." else parent
      sweeps.setdefault(sweep, []).append(load_run(dirpath))
  if not sweeps:
    raise ValueError(f"no runs (config.json + {logs.METRICS_FILE}) under"
                     f" {root!r}")
  return sweeps


def _late_gain(run: Run) -> float | None:
  """Train PSNR at the end minus at 3/4 of the steps (the curve's slope)."""
  series = sorted((s, m["train/psnr"]) for s, m in run.train.items()
                  if "train/psnr" in m)
  if len(series) < 2:
    return None
  end_step, end = series[-1]
  quarter = min(series, key=lambda p: abs(p[0] - 0.75 * end_step))
  return None if quarter[0] == end_step else end - quarter[1]


def _last_train(run: Run, name: str) -> float | None:
  values = [m[name] for _, m in sorted(run.train.items()) if name in m]
  return values[-1] if values else None


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
  return "n/a" if value is None else format(value, spec)


def sweep_table(runs: list[Run]) -> str:
  """One row a finished run: the config fields that vary, then metrics."""
  varying = [f for f in _FIELDS
             if len({repr(f[1](r.config)) for r in runs}) > 1] or [_FIELDS[0]]
  optional = [k for k in ("eval/lpips", "eval/rfid")
              if any(k in r.eval for r in runs)]
  header = ([name for name, _, _ in varying]
            + ["tokens x dim", "bits", "eval codes", "usage", "perplexity",
               "PSNR",
               "SSIM"] + [k.split("/")[1].upper() for k in optional]
            + ["PSNR gain, last 1/4", "token / codeword norm"])
  rows = []
  def order(run):
    key = [repr(f[1](run.config)) for f in varying]
    if _is_zoo(runs):  # by budget first, then axis and quantizer
      key.insert(0, budget(run))
    return key

  budget = budget_of(runs)

  for run in sorted(runs, key=order):
    tokens, dim = num_tokens(run.config["model"])
    ev = run.eval
    model = run.config["model"]
    depth = model.get("rvq_depth", 1)
    shown = (f"{tokens // depth} x {depth} codes x {dim}" if depth > 1
             else f"{tokens} x {dim}")
    if model["quantize"] == "dynamic" and "eval/tokens" in ev:
      most, tokens = tokens, ev["eval/tokens"]  # the eval set's mean
      fine = ""
      if "eval/fine_share" in ev:  # measured where encode runs, vs target
        fine = (f"; fine {ev['eval/fine_share']:.2f}, target"
                f" {model['dynamic']['fine_fraction']:.2f}")
      if "eval/medium_share" in ev:
        fine += (f"; medium {ev['eval/medium_share']:.2f}, target"
                 f" {model['dynamic'].get('medium_fraction', 0.0):.2f}")
      shown = f"{tokens:.1f} (at most {most}{fine}) x {dim}"
    z, e = (_last_train(run, "train/latent_norm"),
            _last_train(run, "train/codeword_norm"))
    rows.append(
        [show(read(run.config)) for _, read, show in varying]
        + [shown, f"{bits_per_image(model, tokens):,.0f}",
           f"{round(ev['eval/images'] * tokens):,}",
           f"{ev['eval/codebook_usage']:.1%}",
           f"{ev['eval/codebook_perplexity']:,.0f}",
           f"{ev['eval/psnr']:.2f}", f"{ev['eval/ssim']:.3f}"]
        + [_fmt(ev.get(k), ".3f" if "lpips" in k else ".2f")
           for k in optional]
        + [_fmt(_late_gain(run), "+.2f"),
           "n/a" if z is None or e is None else f"{z:.2f} / {e:.2f}"])
  return markdown_table(header, rows)


def _is_zoo(runs: list[Run]) -> bool:
  """Several quantizers at several budgets: tables by budget, plots by
  bits."""
  models = [r.config["model"] for r in runs]
  return (len({quantizer_name(m) for m in models}) > 2 and
          len({round(bits_per_image(m, num_tokens(m)[0])) for m in models})
          > 1)


def _series(runs: list[Run], key, x_of, y_of):
  """{label: sorted [(x, y), ...]} over runs grouped by key(run)."""
  out: dict[str, list] = {}
  for run in runs:
    out.setdefault(key(run), []).extend(
        (x, y_of(run, x)) for x in x_of(run))
  return {label: sorted(points) for label, points in sorted(out.items())}


def _plot(path: str, series: dict[str, list], *, xlabel: str, ylabel: str,
          title: str, logx: bool = False) -> str:
  import matplotlib  # noqa: PLC0415 (only the plots need it)

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  fig, ax = plt.subplots(figsize=(6, 4) if len(series) <= 8 else (8, 5),
                         dpi=100)
  colors = {}
  for label, points in series.items():
    xs, ys = zip(*points, strict=True)
    # A quantizer keeps its color along both axes; patch lines are dashed.
    head, _, axis = label.rpartition(", ")
    color = colors.setdefault(head or label, f"C{len(colors) % 10}")
    ax.plot(xs, ys, marker="o", label=label, color=color,
            linestyle="--" if axis == "patch" else "-")
  if logx:
    ax.set_xscale("log", base=2)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  ax.grid(alpha=0.3)
  if len(series) > 8:
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
  else:
    ax.legend(fontsize=8)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def budget_of(runs: list[Run]):
  """run -> its budget in bits, budgets within 2% merged (FSQ's 4,375 codes
  are 12.1 bits to the others' 12) and named by the smallest."""
  exact = lambda r: bits_per_image(r.config["model"],
                                   num_tokens(r.config["model"])[0])
  groups: list[float] = []
  for bits in sorted({exact(r) for r in runs}):
    if not groups or bits > 1.02 * groups[-1]:
      groups.append(bits)
  return lambda r: round(max(g for g in groups if g <= exact(r)))


def _zoo_label(model: dict[str, Any]) -> str:
  name = quantizer_name(model)
  if model.get("quantizer", "vq") == "vq" and model["codebook"].get(
      "kmeans_batches"):
    name += ", k-means init"
  return name


def _zoo_bars(path: str, runs: list[Run], bits_of, value_of, ylabel: str,
              title: str, zero_based: bool = True) -> str:
  """One panel per budget in bits, a pair of bars (channel, patch) per
  quantizer."""
  import matplotlib  # noqa: PLC0415 (only the plots need it)

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # noqa: PLC0415

  budgets = sorted({bits_of(r) for r in runs}, reverse=True)
  names = sorted({_zoo_label(r.config["model"]) for r in runs})
  axes_names = sorted({r.config["model"]["quantize"] for r in runs})
  fig, axes = plt.subplots(1, len(budgets), dpi=100, squeeze=False,
                           figsize=(0.9 * len(names) * len(budgets) + 2, 4.5))
  width = 0.8 / len(axes_names)
  for ax, budget in zip(axes[0], budgets, strict=True):
    for j, axis in enumerate(axes_names):
      xs, ys = [], []
      for i, name in enumerate(names):
        hits = [value_of(r) for r in runs if bits_of(r) == budget
                and r.config["model"]["quantize"] == axis
                and _zoo_label(r.config["model"]) == name]
        if hits:
          xs.append(i + (j - (len(axes_names) - 1) / 2) * width)
          ys.append(hits[0])
      bars = ax.bar(xs, ys, width=width, label=axis, color=f"C{j}")
      ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right",
                  fontsize=8)
    ax.set(title=f"{budget:,} bits per image", ylabel=ylabel)
    if not zero_based:  # differences of a few dB: not from zero
      values = [value_of(r) for r in runs]
      ax.set_ylim(min(values) - 1, max(values) + 0.5)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, bbox_inches="tight")
  plt.close(fig)
  return path


def sweep_plots(name: str, runs: list[Run], out_dir: str) -> list[str]:
  """Usage against K (when K varies), PSNR against kept channels (when
  channel runs differ in alpha), PSNR and SSIM against codes per image
  (when DQ-VAE runs differ in fine share); the PNG paths written."""
  stem, paths = re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_"), []
  model = lambda r: r.config["model"]
  bits = budget_of(runs)
  if _is_zoo(runs):
    for key, ylabel, what in (
        ("eval/psnr", "PSNR (dB)", "psnr"),
        ("eval/codebook_usage", "codebook usage on held-out crops (%)",
         "usage")):
      scale = 100 if "usage" in key else 1
      paths.append(_zoo_bars(
          os.path.join(out_dir, f"{stem}_{what}_vs_bits.png"), runs, bits,
          lambda r, key=key, scale=scale: scale * r.eval[key], ylabel,
          f"{name}: {what} at equal bits per image",
          zero_based=what == "usage"))
  trained = [r for r in runs if len(r.evals) >= 3]  # a few long runs
  if trained and len(runs) <= 6 and len(trained) == len(runs):
    label = lambda r: f"{model(r)['quantize']}, {quantizer_name(model(r))}"
    series = _series(runs, label, lambda r: sorted(r.evals)[1:],
                     lambda r, step: r.evals[step]["eval/psnr"])
    paths.append(_plot(os.path.join(out_dir, f"{stem}_psnr_vs_step.png"),
                       series, xlabel="training step",
                       ylabel="PSNR on held-out crops (dB)",
                       title=f"{name}: eval PSNR during training"))
  if len({model(r)["num_codes"] for r in runs}) > 1 and not paths:
    series = _series(
        runs, lambda r: f"{model(r)['quantize']}, "
        f"{quantizer_name(model(r))}",
        lambda r: [model(r)["num_codes"]],
        lambda r, _: 100 * r.eval["eval/codebook_usage"])
    paths.append(_plot(os.path.join(out_dir, f"{stem}_usage_vs_k.png"),
                       series, xlabel="codebook size K", logx=True,
                       ylabel="codebook usage on held-out crops (%)",
                       title=f"{name}: codebook usage"))
  dynamic = [r for r in runs if model(r)["quantize"] == "dynamic"
             and "eval/tokens" in r.eval]
  if len({model(r)["dynamic"]["fine_fraction"] for r in dynamic}) > 1:
    # '; ': each form its own color (_plot colors by the part before ', ').
    router = lambda r: dq_name(model(r)).split(", fine")[0].replace(", ", "; ")
    for key, ylabel, what in (("eval/psnr", "PSNR (dB)", "psnr"),
                              ("eval/ssim", "SSIM", "ssim")):
      series = _series(dynamic, router, lambda r: [r.eval["eval/tokens"]],
                       lambda r, _, key=key: r.eval[key])
      paths.append(_plot(
          os.path.join(out_dir, f"{stem}_{what}_vs_tokens.png"), series,
          xlabel="codes per held-out image (mean)",
          ylabel=f"{ylabel} on held-out crops",
          title=f"{name}: {what} against codes per image"))
  channel = [r for r in runs if model(r)["quantize"] == "channel"]
  if len({model(r)["nested_dropout_alpha"] for r in channel}) > 1:
    prefix = lambda r: sorted(int(k.rsplit("_", 1)[1]) for k in r.eval
                              if k.startswith("eval/psnr_first_"))
    series = _series(
        channel, lambda r: f"alpha = {model(r)['nested_dropout_alpha']}",
        prefix, lambda r, k: r.eval[f"eval/psnr_first_{k}"])
    paths.append(_plot(os.path.join(out_dir, f"{stem}_psnr_vs_kept.png"),
                       series, xlabel="channels kept (the first k)", logx=True,
                       ylabel="PSNR (dB)",
                       title=f"{name}: coarse to fine"))
  return paths


def machine() -> str:
  import jax  # noqa: PLC0415

  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  cpu = platform.processor() or platform.machine()
  return (f"{jax.device_count()} x {kind} ({dev.platform}), host {cpu} with"
          f" {os.cpu_count()} cores, jax {jax.__version__}, Python"
          f" {platform.python_version()}")


def replace_block(text: str, marker: str, name: str, block: str) -> str:
  """`text` with the block between <!-- MARKER:NAME --> and
  <!-- /MARKER:NAME --> replaced by `block` (appended when absent)."""
  begin, end = f"<!-- {marker}:{name} -->", f"<!-- /{marker}:{name} -->"
  section = f"{begin}\n{block.strip()}\n{end}"
  pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
  if pattern.search(text):
    return pattern.sub(lambda _: section, text)
  return text.rstrip() + "\n\n" + section + "\n"


def _run_dates(runs: list[Run]) -> str:
  stamps = sorted(os.path.getmtime(os.path.join(r.path, logs.METRICS_FILE))
                  for r in runs)
  day = lambda t: datetime.datetime.fromtimestamp(t, datetime.UTC).strftime(
      "%Y-%m-%d %H:%M UTC")
  return day(stamps[0]) if len(stamps) == 1 else (
      f"{day(stamps[0])} to {day(stamps[-1])}")


def build(root: str, out: str, *, run_machine: str = "",
          command: str = "python -m cvqcar.report") -> str:
  """Rewrites the generated blocks of `out` from the runs under `root`;
  returns the page."""
  sweeps = find_runs(root)
  page = (open(out).read() if os.path.exists(out) else
          "# Results\n\nTables and plots below are generated by `python -m"
          " cvqcar.report` from finished runs; text outside the generated"
          " blocks is written by hand.\n")
  out_dir = os.path.join(os.path.dirname(out) or ".", "results")
  for name, runs in sweeps.items():
    done = [r for r in runs if r.finished]
    lines = [f"### {name}", ""]
    sweep_file = os.path.join("configs", "sweeps",
                              f"{os.path.basename(name)}.py")
    if os.path.isfile(sweep_file):
      lines.append(f"- runs: `python launch/sweep.py --sweep={sweep_file}`")
    lines += [f"- table and plots: `{command}`",
              f"- machine: {run_machine or machine()}",
              f"- runs finished: {_run_dates(runs)}", ""]
    if done:
      lines += [sweep_table(done), ""]
      for path in sweep_plots(name, done, out_dir):
        rel = os.path.relpath(path, os.path.dirname(out) or ".")
        lines += [f"![{os.path.basename(path)}]({rel})", ""]
    unfinished = sorted(os.path.basename(r.path) for r in runs
                        if not r.finished)
    if unfinished:
      lines.append(f"Still training (not tabulated): {', '.join(unfinished)}")
    page = replace_block(page, "report", name, "\n".join(lines))
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    f.write(page)
  return page


def main(argv: list[str] | None = None) -> int:
  import argparse  # noqa: PLC0415

  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default="runs/sweeps",
                      help="directory of run directories (any depth)")
  parser.add_argument("--out", default="docs/results.md")
  parser.add_argument("--machine", default="",
                      help="the machine the runs ran on (default: this one)")
  argv = sys.argv[1:] if argv is None else argv
  args = parser.parse_args(argv)
  command = " ".join(["python -m cvqcar.report", *map(shlex.quote, argv)])
  try:
    build(args.runs, args.out, run_machine=args.machine, command=command)
  except ValueError as e:
    print(f"report: {e}", file=sys.stderr)
    return 1
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
