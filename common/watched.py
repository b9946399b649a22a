"""A value read from files and read again when one of them changes: the key table
(common/dkimkeys.py) and the transport table (common/transport.py).

At most one round of stat() per ``check_every`` seconds of the injected clock, no thread and no
watcher: a file counts as changed when its mtime, size or inode do. The first read is the caller's
(its error goes to the caller: at start-up, one line and exit 78); a later read that fails with one
of ``errors`` is logged once, as an error, and the value read before stays in force until a read
succeeds.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Generic, TypeVar

__all__ = ["Watched"]

T = TypeVar("T")
Version = tuple[tuple[int, int, int], ...]


def _version(files: Iterable[Path]) -> Version | None:
    try:
        return tuple((st.st_mtime_ns, st.st_size, st.st_ino) for st in (f.stat() for f in files))
    except OSError:
        return None


class Watched(Generic[T]):
    def __init__(
        self,
        load: Callable[[], T],
        files: Callable[[T], Iterable[Path]],
        *,
        errors: tuple[type[Exception], ...],
        describe: Callable[[T], str],
        log: logging.Logger,
        clock: Callable[[], float] = time.monotonic,
        check_every: float = 1.0,
    ) -> None:
        self._load, self._files, self._errors = load, files, errors
        self.describe, self.log = describe, log
        self.clock, self.check_every = clock, check_every
        self.value = load()
        self._version = _version(files(self.value))
        self._checked = clock()
        self.failing = False

    def get(self) -> T:
        now = self.clock()
        if now - self._checked >= self.check_every:
            self._checked = now
            self._refresh()
        return self.value

    def _refresh(self) -> None:
        version = _version(self._files(self.value))
        if version is not None and version == self._version:
            return
        try:
            value = self._load()
        except self._errors as e:
            if not self.failing:  # once per breakage, not once per message
                self.log.error("%s: keeping %s", e, self.describe(self.value))
            self.failing = True
            return
        self.value, self.failing = value, False
        self._version = _version(self._files(value))
        self.log.info("re-read: %s", self.describe(value))
