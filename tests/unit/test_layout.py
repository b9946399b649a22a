"""The layout's rules, checked: imports run downward only (mtaq/ -> ingress/, worker/ -> common/),
and the one dependency no import shows, the delivery job named by string, is real."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from rq.utils import import_attribute

import worker.jobs
from common import jobqueue

ROOT = Path(__file__).resolve().parents[2]


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports anywhere in it (function-local imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def modules(package: str) -> list[Path]:
    """Every module of a package, its subpackages' included (common/smtp/ is common/)."""
    return sorted((ROOT / package).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    return {
        node.module
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.ImportFrom) and node.module
    }


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("common", {"ingress", "worker", "mtaq"}),
        ("common/smtp", {"ingress", "worker", "mtaq"}),
        ("ingress", {"worker", "mtaq"}),
        ("worker", {"ingress", "mtaq"}),
    ],
)
def test_imports_run_downward(package: str, forbidden: set[str]) -> None:
    found = modules(package)
    assert found, package
    bad = {str(p.relative_to(ROOT)): sorted(imported_packages(p) & forbidden) for p in found}
    assert {k: v for k, v in bad.items() if v} == {}


def test_subpackages_are_seen() -> None:
    # the rule above must look below the top level: a subpackage's modules are in the walk
    assert ROOT / "common" / "smtp" / "reply.py" in modules("common")


def test_one_resolver_and_one_client_for_both_sides() -> None:
    # the MX lookup is written once (common/mx.py: only it asks DNS), and the ingress's
    # verification speaks SMTP through common/smtp's client, not a reader of its own
    speak_dns = sorted(
        str(p.relative_to(ROOT))
        for package in ("common", "ingress", "worker", "mtaq")
        for p in modules(package)
        if "dns" in imported_packages(p)
    )
    assert speak_dns == ["common/mx.py"]
    verify = ROOT / "ingress" / "verify.py"
    assert "common.smtp.client" in imported_modules(verify) and "common.mx" in imported_modules(verify)
    assert "readline" not in verify.read_text()  # no reply parsing of its own


def test_the_smtp_package_is_the_only_reply_type() -> None:
    # one Reply for both sides: the ingress's catalogue and the client's remote replies are one type
    from common.smtp import client
    from common.smtp.reply import Reply
    from ingress import replies

    assert replies.Reply is Reply
    session = client.Client("me.test", "mx.test[192.0.2.1]:25")
    session.receive_data(b"220 mx.test ESMTP\r\n")
    assert type(session.last_reply) is Reply


def test_delivery_job_path_names_the_real_function() -> None:
    assert import_attribute(jobqueue.DELIVER_FUNC) is worker.jobs.deliver
