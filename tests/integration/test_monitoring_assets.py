"""The Grafana dashboard and the Prometheus alert rules shipped in deploy/ (issue 16), checked
against what /metrics exports from a real redis-server, and by Prometheus's own promtool (Debian's
``prometheus`` package; .ci/run installs it): the rules load, their unit tests pass, the
exposition passes ``promtool check metrics``, the scrape configuration of the compose profile
loads."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from common.envelope import Envelope, RcptState, Recipient, RecipientStatus
from common.metrics import LATENCY_BUCKET_PREFIX, REJECTED_PREFIX
from common.store import STATS, Message, Store, dest_key
from mtaq.ops.exporter import Monitor, MtaqCollector
from tests.fixtures import ROOT
from tests.redisserver import RedisServer
from tests.tools import require

DASHBOARD = ROOT / "deploy" / "grafana" / "mtaq.json"
RULES = ROOT / "deploy" / "prometheus" / "mtaq-alerts.yml"
RULES_TEST = ROOT / "deploy" / "prometheus" / "mtaq-alerts.test.yml"
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
_SERIES = re.compile(r"\bmtaq_[a-z0-9_]+\b")


def exposition(redis_server: RedisServer) -> str:
    """/metrics of a queue with something in every family (labelled ones are empty otherwise)."""
    r = redis.Redis.from_url(redis_server.url)
    store = Store(r)
    store.commit(
        [
            Message(Envelope(id=f"Q{i}", sender="a@s.test", recipients=[Recipient(f"u{i}@d{i % 2}.test")]), b"x" * 99)
            for i in range(4)
        ]
    )
    store.set_statuses({"Q1": {0: RecipientStatus(state=RcptState.DEFERRED, reply="451 4.3.0 later")}})
    store.hold(["Q2"])
    r.hset(STATS, mapping={f"{REJECTED_PREFIX}452": 1, f"{LATENCY_BUCKET_PREFIX}1": 1, "delivered": 3})
    r.zadd(dest_key("d0.test", "slots"), {"token": 2e9})
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MtaqCollector(Monitor(r)))
    return generate_latest(registry).decode()


def exported(text: str) -> set[str]:
    """Sample names and family names (a histogram's family has no sample of its own name)."""
    out: set[str] = set()
    for fam in text_string_to_metric_families(text):
        out.add(fam.name)
        out.update(s.name for s in fam.samples)
    return out


def dashboard_queries(doc: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def promtool() -> str:
    return require("promtool")  # Debian's prometheus package; .ci/run installs it


def test_dashboard_queries_name_only_series_that_metrics_exports(redis_server: RedisServer) -> None:
    names = exported(exposition(redis_server))
    doc = json.loads(DASHBOARD.read_text())
    queries = dashboard_queries(doc)
    assert len(queries) >= 15
    used = {n for q in queries for n in _SERIES.findall(q)}
    assert used - names == set(), f"the dashboard asks for series /metrics does not export: {used - names}"
    # what the issue asks the dashboard to show
    for needed in (
        "mtaq_destination_queue_messages",
        "mtaq_destination_oldest_age_seconds",
        "mtaq_deliveries_total",
        "mtaq_delivery_latency_seconds_bucket",
        "mtaq_workers_alive",
        "mtaq_redis_memory_used_bytes",
    ):
        assert needed in used, needed
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids)) and doc["uid"] and doc["title"]
    for p in doc["panels"]:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24


def test_alert_rules_name_only_exported_series_and_pass_promtool(redis_server: RedisServer) -> None:
    text = exposition(redis_server)
    used = set(_SERIES.findall(RULES.read_text()))
    assert used - exported(text) == set()
    for alert in ("MtaqQueueOldMail", "MtaqDeferralRateHigh", "MtaqNoWorker", "MtaqRedisMemoryNearMax"):
        assert f"alert: {alert}" in RULES.read_text()
    tool = promtool()
    for args in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TEST)]):
        r = subprocess.run([tool, *args], capture_output=True, text=True, timeout=60, cwd=RULES.parent)
        assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_prometheus_config_of_the_compose_profile_loads(tmp_path: Path) -> None:
    tool = promtool()
    # the config names the rules where the compose file mounts them: check it beside a copy
    (tmp_path / "prometheus.yml").write_text(PROMETHEUS_CONFIG.read_text().replace("/etc/prometheus/", ""))
    shutil.copy(RULES, tmp_path / "mtaq-alerts.yml")
    r = subprocess.run([tool, "check", "config", str(tmp_path / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_compose_monitoring_profile_mounts_these_files() -> None:
    from ruamel.yaml import YAML

    services = YAML(typ="safe").load((ROOT / "docker-compose.yml").read_text())["services"]
    profile = {n: s for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert set(profile) == {"prometheus", "grafana"}
    mounted = {v.split(":")[0] for s in profile.values() for v in s["volumes"] if v.startswith("./")}
    assert {"./deploy/prometheus/mtaq-alerts.yml", "./deploy/grafana/mtaq.json"} <= mounted
    for path in mounted:
        assert (ROOT / path).exists(), path
    assert 'targets: ["exporter:9125"]' in PROMETHEUS_CONFIG.read_text()  # the compose exporter's port
