"""The results file of a sweep: one row per (point, repeat), appended as each run finishes.

Invariants of `ResultsStore` while it is open:
- it holds an exclusive lock (``<file>.lock``, flock): a second sweep on the same file fails at open
  with a clear error instead of interleaving rows with this one;
- the file was checked writable before any point ran (open fails otherwise);
- ``records`` mirrors the file: {(point_id, repeat): row}; a row reaches the file whole or not at all
  (JSONL: one write of a complete line; Parquet: a rewrite to a uniquely named temporary file in the
  same folder, then an atomic rename);
- a truncated last JSONL line (a run killed mid-write) is dropped with a warning at open, and the file
  is cut back to its last complete line, so that run is simply redone.
Per-point frames (steps, requests, telemetry) go beside the file in ``<stem>.points/``.
"""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile

import pandas as pd

from .schema import C

log = logging.getLogger(__name__)

FORMATS = (".jsonl", ".parquet")


class StoreLockedError(RuntimeError):
    """Another process has the results file open."""


def _key(row: dict) -> tuple[str, int]:
    r = row.get(C.repeat)
    return row[C.point_id], 0 if r is None or (isinstance(r, float) and math.isnan(r)) else int(r)


class ResultsStore:
    """A results file (.jsonl or .parquet), or nothing (path=None: rows are kept in memory only)."""

    def __init__(self, path: str | None):
        if path is not None and not str(path).endswith(FORMATS):
            raise ValueError(f"out={path!r}: the results file must end in .jsonl or .parquet")
        self.path = None if path is None else str(path)
        self.records: dict[tuple[str, int], dict] = {}
        self._lock = None

    @property
    def sidecar_dir(self) -> str | None:
        return None if self.path is None else os.path.splitext(self.path)[0] + ".points"

    # --- open / close -------------------------------------------------------------------------------

    def open(self) -> "ResultsStore":
        """Lock the file, check it can be written, and load the rows already there."""
        if self.path is None or self._lock is not None:
            return self
        import fcntl

        folder = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(folder, exist_ok=True)
            lock = open(self.path + ".lock", "a+")
        except OSError as e:
            raise PermissionError(f"cannot write the results file {self.path}: {e.strerror or e}") from e
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StoreLockedError(f"{self.path} is being written by another sweep (lock {self.path}.lock): "
                                   f"wait for it, or give this sweep another --out") from None
        self._lock = lock
        try:
            if not os.access(folder, os.W_OK) or (os.path.exists(self.path) and not os.access(self.path, os.W_OK)):
                raise PermissionError(f"cannot write the results file {self.path}: no write permission")
            self._load()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        if self._lock is not None:
            import fcntl

            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def __enter__(self):
        return self.open()

    def __exit__(self, *exc):
        self.close()

    # --- rows ---------------------------------------------------------------------------------------

    def _load(self) -> None:
        if not os.path.exists(self.path):
            return
        if self.path.endswith(".parquet"):
            recs = pd.read_parquet(self.path).to_dict("records")
        else:
            recs = self._read_jsonl()
        self.records = {_key(r): r for r in recs}

    def _read_jsonl(self) -> list[dict]:
        with open(self.path, "rb") as f:
            data = f.read()
        lines, good_bytes, recs = data.split(b"\n"), 0, []
        for i, line in enumerate(lines):
            if not line.strip():
                good_bytes += len(line) + 1
                continue
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                    raise ValueError(f"{self.path}: line {i + 1} is not JSON (and it is not the last line)") from None
                log.warning("%s: the last line is incomplete (a run killed while writing it): dropped, its point "
                            "will run again", self.path)
                with open(self.path, "r+b") as f:
                    f.truncate(good_bytes)
                break
            good_bytes += len(line) + 1
        return recs

    def done(self, point_id: str, repeat: int) -> dict | None:
        return self.records.get((point_id, repeat))

    def append(self, row: dict) -> None:
        """Add one run's row (keyed by point_id and repeat) to the records and the file."""
        self.records[_key(row)] = row
        if self.path is None:
            return
        if self.path.endswith(".jsonl"):
            clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
            line = (json.dumps(clean, default=str) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        else:  # Parquet cannot append: rewrite to a private temporary file, then rename over the file
            fd, tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp",
                                       dir=os.path.dirname(os.path.abspath(self.path)))
            os.close(fd)
            try:
                pd.DataFrame(list(self.records.values())).to_parquet(tmp, index=False)
                os.replace(tmp, self.path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise

    def runs(self) -> pd.DataFrame:
        """Every recorded run, one row each."""
        return pd.DataFrame(list(self.records.values()))

    # --- per-point frames ----------------------------------------------------------------------------

    def save_frames(self, point_id: str, frames: dict) -> None:
        if self.sidecar_dir is None:
            return
        try:
            os.makedirs(self.sidecar_dir, exist_ok=True)
            for kind, df in frames.items():
                if df is not None and len(df):
                    df.to_parquet(os.path.join(self.sidecar_dir, f"{point_id}.{kind}.parquet"), index=False)
        except ImportError:
            log.warning("pyarrow is missing: per-point time series are not saved beside %s", self.path)

    def load_frames(self, point_id: str) -> dict:
        """{kind: DataFrame} of the frames saved for a point (steps, requests, telemetry)."""
        out = {}
        for kind in ("steps", "requests", "telemetry"):
            path = os.path.join(self.sidecar_dir or "", f"{point_id}.{kind}.parquet")
            if self.sidecar_dir and os.path.exists(path):
                df = pd.read_parquet(path)
                if kind == "requests" and "itl" in df:
                    df["itl"] = df["itl"].map(list)
                out[kind] = df
        return out
