"""Logging setup and the rate-limited warning used for bad device input.

Level policy: bad device input is WARNING at most and rate-limited per key; operator
mistakes (bad config) are ERROR; secrets (PSKs, client secrets) are never logged.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, worker and snake_case extras."""

    _SKIP = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker is not None:
            out["worker"] = self._worker
        for key, val in record.__dict__.items():
            if key not in self._SKIP:
                out[key] = val
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO", fmt: str = "text", worker: str | None = None) -> None:
    """Called once by the CLI; `worker` (`w0`, `w1`, ...) tags a worker process's lines."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(worker))
    else:
        tag = f" [{worker}]" if worker else ""
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLogger:
    """Logs a message at most once per `interval_s` per key; says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_keys: int = 10_000):
        self._log = logger
        self._interval = interval_s
        self._max_keys = max_keys
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, key: str, msg: str, *args: Any) -> None:
        self._emit(logging.WARNING, key, msg, args, False)

    def error(self, key: str, msg: str, *args: Any) -> None:
        self._emit(logging.ERROR, key, msg, args, False)

    def exception(self, key: str, msg: str, *args: Any) -> None:
        """ERROR with the current exception's traceback (call from an except block)."""
        self._emit(logging.ERROR, key, msg, args, True)

    def _emit(self, level: int, key: str, msg: str, args: tuple[Any, ...],
              exc_info: bool) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return
        if len(self._last) >= self._max_keys:
            self._last.clear()
        suppressed = last[1] if last else 0
        if suppressed:
            msg += " (%d similar suppressed)"
            args = (*args, suppressed)
        self._log.log(level, msg, *args, exc_info=exc_info)
        self._last[key] = (now, 0)
