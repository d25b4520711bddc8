"""Where the command line prints: results on stdout (parsable with ``--json``), logs on stderr."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog


def log_to_stderr(name: str) -> logging.Logger:
    """Send every log record (ours at INFO, libraries' at WARNING) to stderr, and return our logger.

    Called after Airflow is imported: its logging set-up writes hooks' structlog records to stdout and
    may point stdlib handlers there, which would mix log lines into a ``--json`` result.
    """
    factory: Any = structlog.get_config().get("logger_factory")
    if hasattr(factory, "io") and hasattr(factory, "cls"):  # Airflow's own structlog logger factory
        factory.io = sys.stderr.buffer if issubclass(factory.cls, structlog.BytesLogger) else sys.stderr
    for existing in list(logging.root.manager.loggerDict.values()):
        if isinstance(existing, logging.Logger):
            for old in list(existing.handlers):
                if getattr(old, "stream", None) is sys.stdout:
                    existing.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logging.basicConfig(handlers=[handler], level=logging.WARNING, force=True)
    log = logging.getLogger(name)
    log.setLevel(logging.INFO)
    return log
