"""Expands a sweep file into one launcher command per point and runs them.

Needs: the venv from the README quick start (plus sbatch or gcloud for the
slurm and tpu_pod launchers). Run from anywhere:

  python launch/sweep.py --sweep=configs/sweeps/codebook_size.py --dry_run
  python launch/sweep.py --sweep=configs/sweeps/codebook_size.py \
      --launcher=slurm --workdir_root=/shared/runs/codebook_size
  python launch/sweep.py --sweep=configs/sweeps/car_tiny.py --dry_run

A sweep file defines `get_sweep()` returning {"config": "FILE[:ARGS]",
"workdir_root": DIR, "points": [{"model.num_codes": 1024, ...}, ...]} and
optionally "fixed": {FIELD: VALUE} for every point. Each point becomes
`--config.FIELD=VALUE` overrides (the fixed ones first) and its own workdir,
WORKDIR_ROOT/<field>-<value>_... (last name of each field the point sets),
run through
launch/local.sh (one after another here), `sbatch launch/slurm.sbatch` (one
job per point) or launch/tpu_pod.sh (one after another on the pod); the
first failing command stops the sweep. Every field of every point is checked
against the config, and every rendered value parsed back, before anything
runs. The config path and relative workdirs are relative to the repo root,
where the commands run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from typing import Any

import ml_collections
from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# Config files import their package (`from configs import cvq_tokenizer`,
# the CAR and DQ configs) and sweep files build on others (configs.sweeps):
# this checkout's, first, even where another copy is installed.
if ROOT not in sys.path[:1]:
  sys.path.insert(0, ROOT)

_SWEEP = flags.DEFINE_string(
    "sweep", None, "Sweep file: a module with get_sweep() -> dict.")
_LAUNCHER = flags.DEFINE_enum(
    "launcher", "local", ["local", "slurm", "tpu_pod"],
    "local: launch/local.sh here, one point after another; slurm: one"
    " sbatch job per point; tpu_pod: launch/tpu_pod.sh, one after another.")
_WORKDIR_ROOT = flags.DEFINE_string(
    "workdir_root", None, "Parent of the per-point workdirs (default: the"
    " sweep's workdir_root). Use a gs:// path for tpu_pod.")
_ONLY = flags.DEFINE_list(
    "only", [], "Run only these points, 1-based as numbered in the output"
    " (e.g. 3,4,5 or 3-10): to split a sweep over machines.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Print the commands, one a line, and run nothing.")


def load_sweep(path: str) -> dict[str, Any]:
  """get_sweep() of the file at `path`, with its keys checked."""
  if not os.path.isfile(path):
    raise ValueError(f"no sweep file {path!r}")
  spec = importlib.util.spec_from_file_location("sweep_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"sweep file {path!r} defines no get_sweep()")
  sweep = module.get_sweep()
  if not isinstance(sweep, dict):
    raise ValueError(f"get_sweep() of {path!r} returned {sweep!r}, not a dict")
  missing = {"config", "points"} - set(sweep)
  unknown = set(sweep) - {"config", "points", "workdir_root", "fixed"}
  if missing or unknown:
    raise ValueError(f"get_sweep() of {path!r} needs keys config, points"
                     f" (and optionally workdir_root, fixed); missing"
                     f" {sorted(missing)}, unknown {sorted(unknown)}")
  points = sweep["points"]
  if not points or not all(isinstance(p, dict) for p in points):
    raise ValueError(f"points of {path!r} must be a non-empty list of dicts,"
                     f" got {points!r}")
  if not isinstance(sweep.get("fixed", {}), dict):
    raise ValueError(f"fixed of {path!r} must be a dict, got"
                     f" {sweep['fixed']!r}")
  return sweep


def full_points(sweep: dict[str, Any]) -> list[dict[str, Any]]:
  """Each point's overrides with the sweep's fixed ones first."""
  return [{**sweep.get("fixed", {}), **p} for p in sweep["points"]]


def _literal(value: Any) -> str:
  """A Python literal without spaces: the tuple parser reads "(1,2,2)"."""
  if isinstance(value, tuple | list):
    items = ",".join(_literal(v) for v in value)
    if isinstance(value, list):
      return f"[{items}]"
    return f"({items},)" if len(value) == 1 else f"({items})"
  return repr(value)


def render(value: Any) -> str:
  """VALUE text that ml_collections' --config.FIELD=VALUE parses back."""
  if isinstance(value, tuple | list):
    return _literal(value)
  return str(value)  # bools as True/False, strings plain


def point_name(point: dict[str, Any]) -> str:
  """Filesystem-safe workdir name: num_codes-1024_quantize-patch."""
  parts = [f"{field.rsplit('.', 1)[-1]}-{render(value)}"
           for field, value in point.items()]
  name = re.sub(r"[()\[\]'\"]", "", "_".join(parts))  # (1,2) -> 1-2
  name = re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-.")
  return name or "default"


def overrides(point: dict[str, Any]) -> list[str]:
  return [f"--config.{field}={render(value)}" for field, value in point.items()]


def _parse_config(config_arg: str, args: list[str]):
  """The config as cvqcar.train would see it after these overrides."""
  flag_values = flags.FlagValues()
  argv = ["sweep", f"--config={config_arg}", *args]
  holder = config_flags.DEFINE_config_file(
      "config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return holder.value


def _check_field(config, field: str, where: str) -> None:
  node, path = config, "config"
  for part in field.split("."):
    is_dict = isinstance(node, ml_collections.ConfigDict)
    if not is_dict or part not in node:
      known = (sorted(node.keys()) if is_dict
               else f"a {type(node).__name__}, not a ConfigDict")
      raise ValueError(f"{where}: the config has no field {field!r}"
                       f" ({path} has {known})")
    node, path = node[part], f"{path}.{part}"


def check_points(config_arg: str, points: list[dict[str, Any]]) -> None:
  """Every field exists and every rendered value parses back to itself."""
  config_file = config_arg.split(":", 1)[0]
  if not os.path.isfile(config_file):
    raise ValueError(f"no config file {config_file!r} under {ROOT}")
  config = _parse_config(config_arg, [])
  for i, point in enumerate(points):
    where = f"point {i} {point}"
    for field in point:
      _check_field(config, field, where)
    try:
      parsed = _parse_config(config_arg, overrides(point))
    except (flags.Error, TypeError, ValueError) as e:
      raise ValueError(f"{where}: the overrides {overrides(point)} do not"
                       f" parse: {e}") from e
    for field, want in point.items():
      got = parsed
      for part in field.split("."):
        got = got[part]
      if isinstance(want, list):
        want = tuple(want)  # ml_collections keeps tuple fields as tuples
      if got != want:
        raise ValueError(f"{where}: --config.{field}={render(want)} parses"
                         f" as {got!r}, not {want!r}")


def commands(sweep: dict[str, Any], launcher: str, workdir_root: str,
             job_prefix: str) -> list[list[str]]:
  """One command line per point; paths relative to the repo root."""
  config_arg, cmds, seen = sweep["config"], [], {}
  for i, point in enumerate(sweep["points"]):
    name = point_name(point)
    if name in seen:
      raise ValueError(f"points {seen[name]} and {i} both name their workdir"
                       f" {name!r}: give them different values")
    seen[name] = i
    workdir = f"{workdir_root.rstrip('/')}/{name}"
    args = [config_arg, workdir,
            *overrides({**sweep.get("fixed", {}), **point})]
    if launcher == "local":
      cmds.append(["launch/local.sh", *args])
    elif launcher == "slurm":
      cmds.append(["sbatch", f"--job-name={job_prefix}-{name}",
                   "launch/slurm.sbatch", *args])
    elif launcher == "tpu_pod":
      cmds.append(["launch/tpu_pod.sh", *args])
    else:
      raise ValueError(f"unknown launcher {launcher!r}")
  return cmds


def _span(part: str, count: int) -> list[int]:
  """'3' -> [3]; '3-5' -> [3, 4, 5]; each within 1..count."""
  lo, _, hi = part.partition("-")
  try:
    first, last = int(lo), int(hi or lo)
  except ValueError:
    raise ValueError(f"{part!r} is not N or N-M") from None
  if not 1 <= first <= last <= count:
    raise ValueError(f"{part!r} is outside points 1..{count}")
  return list(range(first, last + 1))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  sweep_path = os.path.abspath(_SWEEP.value)
  os.chdir(ROOT)  # config paths and relative workdirs are from the root
  try:
    sweep = load_sweep(sweep_path)
    workdir_root = _WORKDIR_ROOT.value or sweep.get("workdir_root")
    if not workdir_root:
      raise ValueError("no workdir root: pass --workdir_root or set"
                       " workdir_root in get_sweep()")
    check_points(sweep["config"], full_points(sweep))
    job_prefix = os.path.splitext(os.path.basename(sweep_path))[0]
    cmds = commands(sweep, _LAUNCHER.value, workdir_root, job_prefix)
  except ValueError as e:
    sys.exit(f"sweep {_SWEEP.value}: {e}")
  chosen = list(range(1, len(cmds) + 1))
  if _ONLY.value:
    try:
      chosen = [i for part in _ONLY.value for i in _span(part, len(cmds))]
    except ValueError as e:
      sys.exit(f"sweep {_SWEEP.value}: --only: {e}")
  if _DRY_RUN.value:
    print("\n".join(shlex.join(cmds[i - 1]) for i in chosen))
    return
  if _LAUNCHER.value == "tpu_pod" and "://" not in workdir_root:
    print(f"warning: pod workers share no disk; {workdir_root!r} is a local"
          " path on each worker (use gs://...)", file=sys.stderr)
  for n, i in enumerate(chosen):
    cmd = cmds[i - 1]
    print(f"[{i}/{len(cmds)}] {shlex.join(cmd)}", flush=True)
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code:
      sys.exit(f"sweep: point {i}/{len(cmds)} failed with exit code"
               f" {code}; stopped, {len(chosen) - n - 1} not run: "
               f"{shlex.join(cmd)}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["sweep"])
  app.run(main)
