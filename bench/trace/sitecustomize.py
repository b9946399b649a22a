"""Benchmark instrumentation, loaded only when bench/trace is on PYTHONPATH (bench.throughput
--trace DIR does that for the mtaq processes it starts). Records, one JSON line per event, into
$MTAQ_BENCH_TRACE/<role>-<pid>.jsonl:

- every Store.commit (messages, deletes, seconds): at the ingress that is one group commit;
- every worker.jobs.deliver job (messages it carries, seconds inside the job function).

It wraps the functions after their modules are imported; nothing in the project changes."""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery
import json
import os
import sys
import time
from typing import IO, Any

_DIR = os.environ.get("MTAQ_BENCH_TRACE", "")


def _role() -> str:
    for word in ("ingress", "worker", "run"):
        if word in sys.argv:
            return word
    return "proc"


_out: IO[str] | None = None


def _emit(rec: dict[str, Any]) -> None:
    global _out
    if _out is None:  # kept open for the life of the process (line-buffered)
        _out = open(os.path.join(_DIR, f"{_role()}-{os.getpid()}.jsonl"), "a", buffering=1)  # noqa: SIM115
    rec["t"] = time.time()
    _out.write(json.dumps(rec) + "\n")


def _patch_spool(mod: Any) -> None:
    orig = mod.Spool.commit

    @functools.wraps(orig)
    def commit(self: Any, messages: Any, *, delete: Any = (), **kw: Any) -> Any:
        delete = list(delete)
        t0 = time.perf_counter()
        try:
            return orig(self, messages, delete=delete, **kw)
        finally:
            _emit({"ev": "commit", "n": len(messages), "del": len(delete), "s": time.perf_counter() - t0})

    mod.Spool.commit = commit


def _patch_jobs(mod: Any) -> None:
    orig = mod.deliver

    @functools.wraps(orig)
    def deliver(destination: str, ids: Any, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return orig(destination, ids, *args)
        finally:
            _emit({"ev": "job", "n": len(ids), "s": time.perf_counter() - t0})

    mod.deliver = deliver


_PATCHES = {"common.spool": _patch_spool, "worker.jobs": _patch_jobs}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        loader, patch = spec.loader, _PATCHES[name]
        orig_exec = loader.exec_module

        def exec_module(module: Any) -> None:
            orig_exec(module)
            patch(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder())
