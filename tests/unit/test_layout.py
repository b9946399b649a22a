"""The layout's rules, checked: imports run downward only, and the one dependency no import shows,
the delivery job named by string, is real.

    mtaq/ (the commands: cli, opscmd, queuecmd, queuefmt)
      -> mtaq/ops/ (the operator's tools), mtaq/runtime/ (the processes)  -- neither imports the other
        -> ingress/, worker/  -- neither imports the other
          -> common/  -- what both sides share

Every package is checked with its subpackages (common/smtp/ follows common/'s rule)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from rq.utils import import_attribute

import worker.jobs
from common import jobqueue

ROOT = Path(__file__).resolve().parents[2]
# the command modules at the top of mtaq/: nothing below them imports one
COMMANDS = frozenset(f"mtaq.{p.stem}" for p in (ROOT / "mtaq").glob("*.py") if p.stem != "__init__")

RULES: list[tuple[str, frozenset[str]]] = [
    ("common", frozenset({"ingress", "worker", "mtaq"})),
    ("ingress", frozenset({"worker", "mtaq"})),
    ("worker", frozenset({"ingress", "mtaq"})),
    ("mtaq/ops", frozenset({"mtaq.runtime", *COMMANDS})),
    ("mtaq/runtime", frozenset({"mtaq.ops", *COMMANDS})),
]


def imported_modules(path: Path) -> set[str]:
    """Dotted names a module imports anywhere in it (function-local imports included); for
    ``from a import b`` both ``a`` and ``a.b`` (b may be a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def within(name: str, room: str) -> bool:
    return name == room or name.startswith(room + ".")


def violations(package: str, forbidden: frozenset[str]) -> dict[str, list[str]]:
    bad: dict[str, list[str]] = {}
    for p in sorted((ROOT / package).rglob("*.py")):
        hits = sorted(n for n in imported_modules(p) if any(within(n, room) for room in forbidden))
        if hits:
            bad[str(p.relative_to(ROOT))] = hits
    return bad


@pytest.mark.parametrize(("package", "forbidden"), RULES, ids=[r[0] for r in RULES])
def test_imports_run_downward(package: str, forbidden: frozenset[str]) -> None:
    assert violations(package, forbidden) == {}


def test_the_rules_see_the_command_modules_and_subpackages() -> None:
    # the checks above cannot pass by looking at nothing
    assert {"mtaq.cli", "mtaq.queuecmd", "mtaq.opscmd"} <= COMMANDS
    assert (ROOT / "mtaq/ops/exporter.py").exists() and (ROOT / "mtaq/runtime/supervise.py").exists()
    assert "mtaq.ops.queueview" in imported_modules(ROOT / "mtaq/ops/statuspage.py")
    assert violations("mtaq/ops", frozenset({"mtaq.ops.queueview"})) != {}  # a subpackage's files are read


def modules(package: str) -> list[Path]:
    """Every module of a package, its subpackages' included (common/smtp/ is common/)."""
    return sorted((ROOT / package).rglob("*.py"))


def imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports."""
    return {name.split(".")[0] for name in imported_modules(path)}


def test_subpackages_are_seen() -> None:
    # the rule above must look below the top level: a subpackage's modules are in the walk
    assert ROOT / "common" / "smtp" / "reply.py" in modules("common")


def test_one_resolver_and_one_client_for_both_sides() -> None:
    # the MX lookup is written once (common/mx.py), and the ingress's verification speaks SMTP
    # through common/smtp's client, not a reader of its own. Beside it only the outbound TLS
    # policy asks DNS (TLSA with AD, the MTA-STS and TLS-RPT TXT records, the policy host's
    # address) and `mtaq dkim check` (the selectors' TXT records), on the resolver
    # common/mx.make_resolver builds from dns_servers: one DNS path
    speak_dns = sorted(
        str(p.relative_to(ROOT))
        for package in ("common", "ingress", "worker", "mtaq")
        for p in modules(package)
        if "dns" in imported_packages(p)
    )
    assert speak_dns == [
        "common/mx.py",
        "mtaq/dkimcmd.py",
        "worker/dane.py",
        "worker/mtasts.py",
        "worker/tlsgate.py",
        "worker/tlsrpt.py",
    ]
    assert "common.mx" in imported_modules(ROOT / "mtaq" / "dkimcmd.py")  # make_resolver, not a resolver of its own
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
    assert import_attribute(jobqueue.DRAIN_FUNC) is worker.jobs.drain
