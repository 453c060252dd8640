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


def write_section(name: str, body: str, doc: str = DOC) -> None:
  """Replaces (or appends) the section `name` in `doc` (docs/benchmarks.md
  unless another file is given)."""
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  stamp = datetime.datetime.now(datetime.UTC).strftime(
      "%Y-%m-%d %H:%M UTC")
  section = (f"## {name}\n\n- command: `{command}`\n- machine: {machine()}\n"
             f"- date: {stamp}\n\n{body.strip()}")
  text = open(doc).read() if os.path.exists(doc) else _HEADER
  text = replace_block(text, "bench", name, section)
  os.makedirs(os.path.dirname(os.path.abspath(doc)), exist_ok=True)
  with open(doc, "w") as f:
    f.write(text)
  print(f"wrote section '{name}' of {os.path.normpath(doc)}")
