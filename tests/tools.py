"""System tools some tests need (Docker, debootstrap, chromium, Postfix's smtp-sink, Perl's
Mail::DKIM, promtool): skip where a developer's machine lacks one, fail where CI promised it.

``.ci/run`` installs these tools and then exports ``MTAQ_REQUIRE_TOOLS=1`` (with ``CI=true``): from
there a tool that cannot be found is a broken CI image, and a skip would hide the deployment,
status-page and benchmark tests behind a green run. So ``missing`` fails the test instead.
"""

from __future__ import annotations

import os
import shutil

import pytest

__all__ = ["missing", "require", "required"]


def required() -> bool:
    """Whether a missing tool fails the test (CI, through .ci/run) rather than skipping it."""
    return os.environ.get("MTAQ_REQUIRE_TOOLS", "") not in ("", "0")


def missing(problem: str) -> None:
    """Skip the test for ``problem`` (a tool that cannot be had), or fail it where tools are required."""
    if required():
        pytest.fail(f"{problem} (MTAQ_REQUIRE_TOOLS is set: .ci/run installed it, so this is a broken CI image)")
    pytest.skip(problem)


def require(*names: str) -> str:
    """The path of the first of ``names`` on PATH; ``missing`` when there is none."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    missing(f"none of {', '.join(names)} on PATH (.ci/run installs it)")
    raise AssertionError("unreachable")  # pytest.skip/fail raise
