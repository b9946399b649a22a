"""Log set-up shared by every role: one line per event, Postfix-like, to stderr."""

from __future__ import annotations

import logging
import sys

__all__ = ["setup_logging"]


def setup_logging(role: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s mtaq/{role}[%(process)d]: %(levelname)s %(message)s", "%Y-%m-%dT%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # RQ logs every job start and end at INFO: our own delivery line says more, once.
    logging.getLogger("rq").setLevel(max(logging.WARNING, root.level))
