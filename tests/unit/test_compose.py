"""docker-compose.yml and the Dockerfile, checked without a Docker engine: the Compose
specification's schema, every service command a real `mtaq` command, and the portability rules
(no top-level name for docker-compose 1.29, no BuildKit-only syntax, FROM only the base image
argument or an earlier stage, published ports on 127.0.0.1 by default)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

from mtaq.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"


def _compose() -> dict[str, Any]:
    data = YAML(typ="safe").load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_file_validates_against_the_compose_specification() -> None:
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is a test dependency (pip install -e '.[test]')"
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_broken_compose_file_fails_the_validation(tmp_path: Path) -> None:
    bad = tmp_path / "docker-compose.yml"
    bad.write_text(COMPOSE.read_text().replace("    healthcheck:\n      test:", "    healthcheck:\n      tset:", 1))
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or "check-jsonschema"
    r = subprocess.run([exe, "--builtin-schema", "vendor.compose-spec", str(bad)], capture_output=True, text=True)
    # it fails for the key we broke, named with where it is; not for a missing file or a bad schema name
    assert r.returncode == 1, r.stdout + r.stderr
    assert "$.services.redis.healthcheck: 'tset' does not match" in r.stdout, r.stdout + r.stderr


def _mtaq_commands() -> list[tuple[str, list[str]]]:
    out = []
    for name, svc in _compose()["services"].items():
        if "build" not in svc:
            continue  # redis, rq-dashboard: other images
        out.append((name, [str(x) for x in svc["command"]]))
        test = svc.get("healthcheck", {}).get("test")
        assert test, f"{name} has no healthcheck"
        assert test[:2] == ["CMD", "mtaq"], f"{name}'s healthcheck is not an mtaq command"
        out.append((f"{name} healthcheck", [str(x) for x in test[2:]]))
    return out


@pytest.mark.parametrize(("where", "argv"), _mtaq_commands())
def test_every_service_command_is_a_real_mtaq_command(where: str, argv: list[str]) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: `mtaq {' '.join(argv)}` is not an mtaq command (exit {e.code})")


def test_services_the_issue_names_and_portability_rules() -> None:
    data = _compose()
    assert "name" not in data  # docker-compose 1.29 refuses a top-level name
    svcs = data["services"]
    assert {"redis", "ingress", "worker", "exporter", "dashboard"} <= set(svcs)
    assert svcs["redis"]["image"] == "${MTAQ_REDIS_IMAGE:-redis:7}"
    cmd = svcs["redis"]["command"]
    for flag, value in (("--appendonly", "yes"), ("--appendfsync", "always"), ("--maxmemory-policy", "noeviction")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--requirepass" in cmd and "MTAQ_REDIS_PASSWORD" in cmd[cmd.index("--requirepass") + 1]
    assert svcs["redis"]["volumes"] == ["redis-data:/data"]
    assert svcs["ingress"]["ports"] == ["${MTAQ_SMTP_BIND:-127.0.0.1}:${MTAQ_SMTP_PORT:-2525}:25"]
    assert svcs["dashboard"]["profiles"] == ["dashboard"]
    # scaling: no fixed name or host port on the worker
    assert "container_name" not in svcs["worker"] and "ports" not in svcs["worker"]
    for name, svc in svcs.items():
        for port in svc.get("ports", []):
            assert str(port).startswith(("127.0.0.1:", "${MTAQ_SMTP_BIND:-127.0.0.1}:")), (name, port)


def test_dockerfile_builds_from_the_base_image_argument_with_the_classic_builder() -> None:
    text = (ROOT / "Dockerfile").read_text()
    stages: list[str] = []
    for line in text.splitlines():
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            assert m.group(1) == "${MTAQ_BASE_IMAGE}" or m.group(1) in stages, line
            if m.group(2):
                stages.append(m.group(2))
    assert len(stages) >= 1 and text.count("FROM ") >= 2  # multi-stage
    assert "ARG MTAQ_BASE_IMAGE=python:3.11-slim" in text
    assert "# syntax=" not in text and "--mount" not in text and "<<" not in text  # BuildKit-only
    assert "/usr/local/bin/python" not in text
    assert re.search(r"^USER (?!root)\S+", text, re.M)
    assert "--no-index --find-links" in text  # the offline path from wheels/
    assert (ROOT / "wheels").is_dir()
