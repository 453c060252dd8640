"""One trainer per workdir: WORKDIR/lock.json with its holder and a heartbeat.

Process 0 of a job takes the lock before anything is written to the
workdir and keeps it fresh from a background thread; every process learns
the outcome, so a refused job stops on all of them. A lock is live while its
holder's heartbeat is recent and, on the same host, its pid still runs; a
stale lock (the pid gone on this host, or no heartbeat for
`stale_after_s`) is taken over with a warning. On object stores (gs://)
there is no pid to ask across hosts, so the heartbeat rule alone decides,
and two jobs started within the same second could both pass the check
(object stores have no exclusive create): start one job per workdir.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

LOCK_FILE = "lock.json"
_MESSAGE_BYTES = 2048  # the refusal, as broadcast from process 0


# Locks this process holds, by path, with their holders: taking a held lock
# again (the train command, then the loop it runs) nests instead of failing.
_HELD: dict[str, WorkdirLock] = {}


class WorkdirLocked(RuntimeError):
  """Another live trainer holds the workdir."""


def _pid_running(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process: it exists
    return True
  try:  # a zombie (killed, not yet reaped by its parent) holds nothing
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except (OSError, IndexError):
    return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for the block."""

  def __init__(self, workdir: str, *, stale_after_s: float = 600.0,
               heartbeat_s: float | None = None, what: str = "trainer"):
    if stale_after_s <= 0:
      raise ValueError(f"lock stale_after_s must be > 0, got {stale_after_s}")
    self.path = epath.Path(workdir) / LOCK_FILE
    self.stale_after_s = stale_after_s
    self.heartbeat_s = heartbeat_s or min(30.0, stale_after_s / 4)
    self.what = what
    self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.time(), "what": what}
    self._stop = threading.Event()
    self._thread = None
    self._nested = False

  def holder(self) -> dict | None:
    """The current lock record, or None when there is none."""
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (json.JSONDecodeError, OSError):
      # Not a record (damaged by hand or a full disk): its age is the file's,
      # so it goes stale like a holder that stopped beating.
      try:
        mtime = os.path.getmtime(self.path) if "://" not in os.fspath(
            self.path) else 0.0
      except OSError:
        mtime = 0.0
      return {"host": "?", "pid": -1, "heartbeat": mtime,
              "what": "an unreadable lock file"}

  def _live_reason(self, held: dict) -> str | None:
    """Why `held` is live, or None when it is stale."""
    age = time.time() - float(held.get("heartbeat", 0.0))
    if age > self.stale_after_s:
      return None
    if held.get("host") == self.record["host"]:
      pid = int(held.get("pid", -1))
      if pid == os.getpid() or not _pid_running(pid):
        return None
      return f"pid {pid} is running on this host"
    return (f"its heartbeat is {age:.0f}s old (stale after"
            f" {self.stale_after_s:.0f}s)")

  def _describe(self, held: dict) -> str:
    if held.get("pid") == -1:
      return f"an unreadable lock file ({self.path})"
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(
        float(held.get("started", 0.0))))
    return (f"{held.get('what', 'a trainer')} pid {held.get('pid')} on host"
            f" {held.get('host')}, started {started}")

  def _record_text(self) -> str:
    self.record["heartbeat"] = time.time()
    return json.dumps(self.record, indent=2)

  def _write(self) -> None:
    tmp = self.path.parent / f".{LOCK_FILE}.{os.getpid()}.tmp"
    tmp.write_text(self._record_text())
    tmp.replace(self.path)

  def _create(self) -> bool:
    """Creates the lock with our record if there is none (local paths: an
    exclusive hard link of a complete file, so no reader sees it half
    written and of two trainers starting at once one wins)."""
    tmp = self.path.parent / f".{LOCK_FILE}.{os.getpid()}.new"
    tmp.write_text(self._record_text())
    try:
      os.link(tmp, self.path)
      return True
    except FileExistsError:
      return False
    finally:
      tmp.unlink(missing_ok=True)

  def _ours(self) -> bool:
    held = self.holder() or {}
    return all(held.get(k) == self.record[k] for k in ("host", "pid",
                                                       "started"))

  def _try_acquire(self) -> str:
    """'' when this process now holds the lock, else why not."""
    self.path.parent.mkdir(parents=True, exist_ok=True)
    local = "://" not in os.fspath(self.path)
    if local and self._create():
      return ""
    held = self.holder()
    if held is not None:
      reason = self._live_reason(held)
      if reason is not None:
        return (f"{self.path.parent} is in use by {self._describe(held)}"
                f" ({reason}); stop that job first, or wait"
                f" {self.stale_after_s:.0f}s after it died for its lock to"
                f" go stale (or delete {self.path} if you are sure no job"
                " runs there)")
      logging.warning("taking over the stale lock of %s on %s",
                      self._describe(held), self.path.parent)
    self._write()
    if not self._ours():  # another trainer took it over at the same time
      return (f"{self.path.parent} was taken by"
              f" {self._describe(self.holder() or {})}")
    return ""

  def acquire(self) -> None:
    key = os.fspath(self.path)
    if key in _HELD:
      self._nested = True
      return
    message = b""
    if jax.process_index() == 0:
      message = self._try_acquire().encode()[:_MESSAGE_BYTES]
    if jax.process_count() > 1:
      buf = np.zeros(_MESSAGE_BYTES + 1, np.uint8)
      buf[0] = 1 if message else 0
      buf[1:1 + len(message)] = np.frombuffer(message, np.uint8)
      buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
      message = bytes(buf[1:]).rstrip(b"\0") if buf[0] else b""
    if message:
      raise WorkdirLocked(message.decode(errors="replace"))
    _HELD[key] = self
    if jax.process_index() == 0:
      self._thread = threading.Thread(target=self._beat, daemon=True,
                                      name="cvqcar-workdir-lock")
      self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        self._write()
      except OSError as e:  # a full disk or a flaky store: retry next beat
        logging.warning("could not refresh %s: %s", self.path, e)

  def release(self) -> None:
    if self._nested:
      self._nested = False
      return
    _HELD.pop(os.fspath(self.path), None)
    if self._thread is None:
      return
    self._stop.set()
    self._thread.join()
    self._thread = None
    held = self.holder()
    if held and held.get("pid") == self.record["pid"] and (
        held.get("host") == self.record["host"]):
      self.path.unlink(missing_ok=True)

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
