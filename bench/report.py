"""Shared by bench scripts: machine description and docs/benchmarks.md."""

from __future__ import annotations

import datetime
import os
import shlex
import sys

from cvqcar.report import machine, markdown_table, replace_block  # noqa: F401

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
_HEADER = """# Benchmarks

Every table here is written by a script in `bench/`; each section names the
command, machine and date of the run that produced it. Re-run the command to
refresh a section; other sections are left as they are.
"""


def write_section(name: str, body: str) -> None:
  """Replaces (or appends) the section `name` in docs/benchmarks.md."""
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  stamp = datetime.datetime.now(datetime.UTC).strftime(
      "%Y-%m-%d %H:%M UTC")
  section = (f"## {name}\n\n- command: `{command}`\n- machine: {machine()}\n"
             f"- date: {stamp}\n\n{body.strip()}")
  text = open(DOC).read() if os.path.exists(DOC) else _HEADER
  text = replace_block(text, "bench", name, section)
  os.makedirs(os.path.dirname(DOC), exist_ok=True)
  with open(DOC, "w") as f:
    f.write(text)
  print(f"wrote section '{name}' of {os.path.normpath(DOC)}")
