"""Shared by bench scripts: machine description and docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import platform
import re
import shlex
import sys

import jax

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
_HEADER = """# Benchmarks

Every table here is written by a script in `bench/`; each section names the
command, machine and date of the run that produced it. Re-run the command to
refresh a section; other sections are left as they are.
"""


def machine() -> str:
  dev = jax.devices()[0]
  kind = getattr(dev, "device_kind", dev.platform)
  cpu = platform.processor() or platform.machine()
  return (f"{jax.device_count()} x {kind} ({dev.platform}), host {cpu} with"
          f" {os.cpu_count()} cores, jax {jax.__version__}, Python"
          f" {platform.python_version()}")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def write_section(name: str, body: str) -> None:
  """Replaces (or appends) the section `name` in docs/benchmarks.md."""
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  stamp = datetime.datetime.now(datetime.UTC).strftime(
      "%Y-%m-%d %H:%M UTC")
  section = (f"<!-- bench:{name} -->\n## {name}\n\n"
             f"- command: `{command}`\n- machine: {machine()}\n"
             f"- date: {stamp}\n\n{body.strip()}\n<!-- /bench:{name} -->")
  text = open(DOC).read() if os.path.exists(DOC) else _HEADER
  pattern = re.compile(
      rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->",
      re.S)
  if pattern.search(text):
    text = pattern.sub(lambda _: section, text)
  else:
    text = text.rstrip() + "\n\n" + section + "\n"
  os.makedirs(os.path.dirname(DOC), exist_ok=True)
  with open(DOC, "w") as f:
    f.write(text)
  print(f"wrote section '{name}' of {os.path.normpath(DOC)}")
