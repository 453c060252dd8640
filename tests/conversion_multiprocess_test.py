"""The conversion commands split their inputs over a jax.distributed job.

Run without --worker_index/--num_workers, `python -m cvqcar.tokenize_dataset`
and `python -m cvqcar.convert_pairs` join the job of their
--coordinator_address/--num_processes/--process_id flags and take the process
index and count as their share of the inputs. Two localhost processes
sharing one output directory must together write the examples of a
one-process run, each only the shards of its own inputs (I % 2 == w).
"""

import io
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from pairs_test import COLORS, image_bytes, write_tar
from PIL import Image

from conftest import ROOT, free_port
from cvqcar.car import pretokenize
from cvqcar.data import convert, pairs

pytestmark = pytest.mark.slow
PROCESSES = 2
INPUTS = 4  # input shards or files: two for each process
# Loaded by each process (on PYTHONPATH) to record the shards it commits:
# UnitWriter.commit renames a temp file to the shard's name, and os.replace
# raises the `os.rename` audit event. The files themselves cannot say which
# process wrote them, and the commands stay unpatched.
SITECUSTOMIZE = """
import os
import sys

_RENAMES = os.environ.get("CVQCAR_TEST_RENAMES")


def _hook(event, args):
  if event == "os.rename" and os.fspath(args[1]).endswith(".array_record"):
    with open(_RENAMES, "a") as f:
      f.write(os.path.basename(os.fspath(args[1])) + "\\n")


if _RENAMES:
  sys.addaudithook(_hook)
"""


def run_job(module, flags, tmp_path):
  """`python -m module` as the processes of one localhost jax.distributed
  job, each with 2 CPU devices and its own log file (a pipe could fill and
  stall a process while the test reads another); after all exit 0, each
  process's (log, names of the shards it committed)."""
  hooks = tmp_path / "hooks"
  hooks.mkdir(exist_ok=True)
  (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, str(hooks)]),
             JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  cmd = [sys.executable, "-m", module, *flags,
         f"--coordinator_address=localhost:{free_port()}",
         f"--num_processes={PROCESSES}"]
  procs, logs, renames = [], [], []
  for i in range(PROCESSES):
    logs.append(tmp_path / f"{module}.{i}.log")
    renames.append(tmp_path / f"{module}.{i}.renames")
    with open(logs[i], "w") as out:
      procs.append(subprocess.Popen(
          [*cmd, f"--process_id={i}"], cwd=ROOT,
          env=dict(env, CVQCAR_TEST_RENAMES=str(renames[i])), stdout=out,
          stderr=subprocess.STDOUT))
  results = []
  for p, log, committed in zip(procs, logs, renames, strict=True):
    p.wait(timeout=300)
    assert p.returncode == 0, log.read_text()[-3000:]
    names = committed.read_text().split() if committed.exists() else []
    results.append((log.read_text(), names))
  return results


def shards_of(out):
  """{shard name: [(key, caption, image or tokens bytes), ...]} under out."""
  shards = {}
  for path in sorted(pathlib.Path(out).glob("*" + pairs.SHARD_SUFFIX)):
    records = map(pairs.deserialize, pairs.read_source(str(path)))
    shards[path.name] = [
        (r["key"], r["caption"],
         r["tokens"].tobytes() if "tokens" in r else r["image"])
        for r in records]
  return shards


def check_split(results, out, want_dir):
  """Each process committed exactly the shards of its inputs, and the
  shards hold the one-process run's examples, shard by shard."""
  want = shards_of(want_dir)
  assert {int(name.split("-")[1]) for name in want} == set(range(INPUTS))
  for w, (log, committed) in enumerate(results):
    assert re.search(f"JAX process {w} of {PROCESSES}", log), log[-3000:]
    assert re.search(f"worker {w} of {PROCESSES}: ", log), log[-3000:]
    assert re.search(f"finished worker {w} of {PROCESSES}: ", log), log
    assert sorted(committed) == sorted(
        name for name in want if int(name.split("-")[1]) % PROCESSES == w)
  assert shards_of(out) == want


def noise_png(rng, h, w):
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(buf, "PNG")
  return buf.getvalue()


def test_tokenize_dataset_splits_shards_over_processes(tmp_path,
                                                       tokenizer_export):
  rng = np.random.default_rng(0)
  examples = [{"image": noise_png(rng, 16 + 3 * i, 24 - i),
               "caption": f"noise {i}", "key": f"k{i}"} for i in range(8)]
  images = str(tmp_path / "images")
  pairs.write_shards(examples, images, num_shards=INPUTS)
  flags = {"tokenizer": tokenizer_export, "input": images,
           "examples_per_shard": 1, "batch_size": 2}
  out, want_dir = tmp_path / "tokens", str(tmp_path / "want")
  results = run_job("cvqcar.tokenize_dataset",
                    [f"--{k}={v}" for k, v in flags.items()] + [f"--out={out}"],
                    tmp_path)
  stats = pretokenize.tokenize_shards(
      tokenizer_export, images, want_dir, batch_size=2, examples_per_shard=1)
  assert stats == {"read": 8, "written": 8, "skipped": 0}
  for w, (log, _) in enumerate(results):
    assert re.search(f"worker {w} of 2: tokenizing 2 of {INPUTS} input"
                     " shards", log), log[-3000:]
  check_split(results, out, want_dir)
  assert sorted(p.name for p in (out / "progress").iterdir()) == [
      f"{i:05d}.json" for i in range(INPUTS)]
  assert (out / "tokenizer_export.json").exists()


def test_convert_pairs_splits_files_over_processes(tmp_path):
  colors = list(COLORS.items())
  for t in range(INPUTS):
    members = []
    for i in range(3):
      name, rgb = colors[(t + i) % len(colors)]
      members += [(f"t{t}/{i}.png", image_bytes(rgb, w=20 + i)),
                  (f"t{t}/{i}.txt", f"a {name} square {t}.{i}".encode())]
    write_tar(tmp_path / f"part-{t}.tar", members)
  spec = str(tmp_path / "*.tar")
  out, want_dir = tmp_path / "out", str(tmp_path / "want")
  results = run_job("cvqcar.convert_pairs",
                    [f"--input={spec}", "--format=webdataset",
                     f"--out={out}", "--examples_per_shard=2"], tmp_path)
  want = convert.convert(spec, "webdataset", want_dir, examples_per_shard=2)
  assert want.written == 3 * INPUTS and not want.skipped
  for w, (log, _) in enumerate(results):
    assert re.search(f"worker {w} of 2: converting 2 of {INPUTS} webdataset"
                     " inputs", log), log[-3000:]
    done = re.findall(r"done (\S+\.tar): ", log)
    assert [os.path.basename(p) for p in done] == [
        f"part-{t}.tar" for t in range(w, INPUTS, PROCESSES)]
  check_split(results, out, want_dir)
  # Whichever process finished last saw every input's counts.
  assert any("all workers finished: 4/4 inputs, read 12, wrote 12" in log
             for log, _ in results)
