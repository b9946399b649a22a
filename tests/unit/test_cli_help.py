"""Each operator command's --help: only the settings it uses, a line of help for every action and
argument; usage errors as one line."""

from __future__ import annotations

import argparse
import subprocess
import sys

from mtaq.cli import build_parser
from tests.fixtures import ROOT


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def test_every_action_and_argument_has_help() -> None:
    top = _subparsers(build_parser())
    checked = 0
    for name in ("queue", "health", "exporter", "passwd"):
        parsers = {name: top[name], **{f"{name} {k}": v for k, v in _subparsers(top[name]).items()}}
        for where, p in parsers.items():
            for a in p._actions:
                if isinstance(a, argparse._HelpAction):
                    continue
                if isinstance(a, argparse._SubParsersAction):
                    for choice in a._choices_actions:
                        assert choice.help, f"{where}: action {choice.dest} has no help"
                    continue
                assert a.help, f"{where}: {a.option_strings or a.dest} has no help"
                checked += 1
    assert checked > 50


def test_queue_help_shows_only_the_settings_it_uses() -> None:
    top = _subparsers(build_parser())
    listing = _subparsers(top["queue"])["list"].format_help()
    assert "--redis-url" in listing and "--relayhost" in listing
    for foreign in ("--max-message-size", "--tls-cert", "--mynetworks", "--workers", "--smtp-port"):
        assert foreign not in listing
    assert " ".join(top["queue"].format_help().split()).count("[env MTAQ_") == 7  # opscmd.REDIS_SETTINGS
    assert "--listen" in top["health"].format_help() and "--tls-cert" not in top["health"].format_help()


def test_usage_error_is_one_line() -> None:
    r = subprocess.run([sys.executable, "-m", "mtaq", "queue", "nosuch"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--help" in r.stderr, r.stderr
