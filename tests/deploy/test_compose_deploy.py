"""docker-compose.yml, run for real: base images made here (debootstrap into `docker import`, since
no registry is reachable), wheels made on the host, the classic builder, `up --scale worker=3`,
mail to the published port delivered to a sink container, `mtaq queue stats` through `exec`,
metrics from the exporter, `down -v`. Skipped, with the reason, where no Docker engine answers.

Ports are published on 127.0.0.1 only; mail goes only to the sink container this test starts."""

from __future__ import annotations

import email.parser
import json
import os
import re
import secrets
import shutil
import smtplib
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.ports import free_port
from tests.tools import missing as tool_missing
from tests.tools import require

# pytest-timeout counts the module fixture's setup in the first test: a cold image build (debootstrap
# 1200 s, build 900 s, up 300 s at most, each bounded below) is far beyond the suite's 600 s
pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("MTAQ_DEPLOY_BASE_IMAGE", "mtaq-deploy/debian:bookworm")
CACHE = os.environ.get("MTAQ_DEPLOY_CACHE", "/var/cache/mtaq-deploy")
MESSAGES = 6


def _log(t0: float, what: str) -> None:
    print(f"[{time.monotonic() - t0:6.1f}s] {what}", file=sys.stderr, flush=True)


def _compose_cmd() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def _engine_problem() -> str | None:
    if not shutil.which("docker"):
        return "no docker client on PATH (.ci/run installs docker.io)"
    r = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"no Docker engine answers: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
    if _compose_cmd() is None:
        return "neither `docker compose` nor `docker-compose` is installed"
    return None


def _run(cmd: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 600) -> str:
    r = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r.stdout


def _image_python(image: str) -> str:
    out = _run(
        [
            "docker",
            "run",
            "--rm",
            "--network",
            "none",
            image,
            "python3",
            "-c",
            "import platform; print(platform.python_version())",
        ]
    )
    return out.strip()


def complete_wheels(wheels: Path, python_full_version: str) -> list[str]:
    """`pip wheel` on the host resolves for the host's Python; the image's may need more (redis asks
    for async-timeout below 3.11.3). Add, as wheels, what the wheels require under the image's
    Python that is missing. Returns what was added."""
    env: dict[str, str] = {str(k): str(v) for k, v in default_environment().items()}
    env.update(python_full_version=python_full_version, python_version=".".join(python_full_version.split(".")[:2]))
    added: list[str] = []
    while True:
        have = {canonicalize_name(p.name.split("-")[0]) for p in wheels.glob("*.whl")}
        missing: set[str] = set()
        for whl in wheels.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
                msg = email.parser.Parser().parsestr(z.read(meta).decode())
            for line in msg.get_all("Requires-Dist") or []:
                req = Requirement(line)
                if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
                    continue
                if canonicalize_name(req.name) not in have:
                    missing.add(str(req).split(";")[0])
        if not missing:
            return added
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "-d",
                str(wheels),
                *sorted(missing),
            ]
        )
        added += sorted(missing)


def _deploy(
    tmp_path_factory: pytest.TempPathFactory, extra_env: dict[str, str], up_args: list[str]
) -> Iterator[dict[str, object]]:
    """Build the image from this work tree and ``up -d`` the compose file with ``up_args``."""
    problem = _engine_problem()
    if problem:
        print(f"deployment test skipped: {problem}", file=sys.stderr)
        tool_missing(problem)
    compose = _compose_cmd()
    assert compose is not None
    t0 = time.monotonic()
    missing = subprocess.run(["docker", "image", "inspect", BASE_IMAGE], capture_output=True).returncode != 0
    if missing and not shutil.which("debootstrap"):
        tool_missing(f"base image {BASE_IMAGE} missing and no debootstrap to make it (.ci/run installs it)")
    _log(t0, _run(["bash", str(REPO / "tests/deploy/make-base-images.sh"), BASE_IMAGE, CACHE], timeout=1200).strip())

    # the build context: the repository's files as they are in this work tree, and host-made wheels
    ctx = tmp_path_factory.mktemp("ctx")
    files = _run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO).split("\n")
    for name in filter(None, files):
        src = REPO / name
        if src.is_file():
            (ctx / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, ctx / name)
    wheels = ctx / "wheels"
    wheels.mkdir(exist_ok=True)
    _run([sys.executable, "-m", "pip", "wheel", "-q", "-w", str(wheels), str(REPO), "setuptools", "wheel"])
    for own in wheels.glob("mtaq-*.whl"):
        own.unlink()  # the image builds mtaq from the context, not from the host's build
    added = complete_wheels(wheels, _image_python(BASE_IMAGE))
    _log(
        t0,
        f"{len(list(wheels.glob('*.whl')))} wheels on the host"
        + (f" (added for the image: {', '.join(added)})" if added else ""),
    )

    project = f"mtaqd{os.getpid()}{len(up_args)}"
    smtp_port, metrics_port = free_port(["127.0.0.1"]), free_port(["127.0.0.1"])
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": project,
        "DOCKER_BUILDKIT": "0",
        "COMPOSE_DOCKER_CLI_BUILD": "0",
        "MTAQ_BASE_IMAGE": BASE_IMAGE,
        "MTAQ_REDIS_IMAGE": BASE_IMAGE,
        "MTAQ_IMAGE": f"{project}/mtaq:test",
        "MTAQ_REDIS_PASSWORD": secrets.token_hex(16),
        "MTAQ_SMTP_PORT": str(smtp_port),
        "MTAQ_METRICS_PORT": str(metrics_port),
        "MTAQ_RELAYHOST": "sink:25",
        "MTAQ_HOSTNAME": "mtaq.test.invalid",
        "MTAQ_INGRESS_PROCESSES": "1",
        # the host's connections reach the ingress through Docker's NAT, from the bridge's address
        "MTAQ_RELAY_DOMAINS": "example.net",
        **extra_env,
    }
    dc = [*compose, "-f", "docker-compose.yml", "-f", "tests/deploy/compose.test.yml"]
    try:
        _run([*dc, "build", "ingress"], env=env, cwd=ctx, timeout=900)
        _log(t0, "image built (classic builder, no network in the build: wheels/ only)")
        _run([*dc, *up_args], env=env, cwd=ctx, timeout=300)
        _log(t0, " ".join(up_args))
        yield {"t0": t0, "dc": dc, "env": env, "ctx": ctx, "smtp_port": smtp_port, "metrics_port": metrics_port}
    finally:
        logs = subprocess.run(
            [*dc, "logs", "--no-color", "--tail", "30"], env=env, cwd=ctx, capture_output=True, text=True
        )
        print(logs.stdout[-6000:], file=sys.stderr)
        subprocess.run(
            [*dc, "down", "-v", "--remove-orphans", "-t", "5"], env=env, cwd=ctx, capture_output=True, timeout=300
        )
        subprocess.run(["docker", "image", "rm", "-f", env["MTAQ_IMAGE"]], capture_output=True)
        _log(t0, "down -v")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    yield from _deploy(tmp_path_factory, {}, ["up", "-d", "--no-build", "--scale", "worker=3"])


@pytest.fixture(scope="module")
def ha_deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The ha profile as docs/high-availability.md sets it up: two lines in .env, one flag."""
    ha = {
        "MTAQ_REDIS_SENTINELS": "sentinel-1:26379,sentinel-2:26379,sentinel-3:26379",
        "MTAQ_REDIS_MIN_REPLICAS": "1",
    }
    yield from _deploy(tmp_path_factory, ha, ["--profile", "ha", "up", "-d", "--no-build", "--scale", "worker=2"])


def _wait(what: str, check: object, timeout: float, t0: float) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            if check():
                _log(t0, what)
                return
        except (OSError, AssertionError, subprocess.SubprocessError) as e:
            last = str(e)
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for: {what}; last: {last[-2000:]}")
        time.sleep(1)


def test_compose_deployment_delivers_mail(deployment: dict[str, object]) -> None:
    t0 = float(deployment["t0"])  # type: ignore[arg-type]
    dc: list[str] = deployment["dc"]  # type: ignore[assignment]
    env: dict[str, str] = deployment["env"]  # type: ignore[assignment]
    ctx = Path(str(deployment["ctx"]))
    smtp_port = int(deployment["smtp_port"])  # type: ignore[call-overload]
    metrics_port = int(deployment["metrics_port"])  # type: ignore[call-overload]

    def healthy() -> bool:
        out = _run([*dc, "exec", "-T", "ingress", "mtaq", "health"], env=env, cwd=ctx)
        return "worker: ok" in out and "ingress: ok" in out

    _wait("`mtaq health` ok in the ingress container (redis, ingress greets 220, workers beat)", healthy, 120, t0)
    aof = _run([*dc, "exec", "-T", "redis", "redis-cli", "config", "get", "appendfsync"], env=env, cwd=ctx)
    assert aof.split() == ["appendfsync", "always"], aof
    # the containers' ids, one a line: `ps` itself wraps long names over two lines
    workers = _run([*dc, "ps", "-q", "worker"], env=env, cwd=ctx).split()
    assert len(workers) == 3, workers

    with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as s:
        for i in range(MESSAGES):
            refused = s.sendmail(
                "ops@example.com", [f"user{i}@example.net"], f"Subject: deploy {i}\r\n\r\nhello {i}\r\n"
            )
            assert refused == {}
    _log(t0, f"{MESSAGES} messages accepted on 127.0.0.1:{smtp_port} (host 127.0.0.1 -> container port 25)")

    def delivered() -> bool:
        out = _run([*dc, "exec", "-T", "sink", "sh", "-c", "ls /mail | wc -l"], env=env, cwd=ctx)
        return int(out.strip()) >= MESSAGES

    _wait(f"{MESSAGES} messages delivered to the sink container", delivered, 120, t0)

    def queue_empty() -> bool:
        out = _run([*dc, "exec", "-T", "ingress", "mtaq", "queue", "stats"], env=env, cwd=ctx)
        return re.search(r"^messages in queue: 0 ", out, re.M) is not None

    _wait("queue empty", queue_empty, 60, t0)
    stats = _run([*dc, "exec", "-T", "ingress", "mtaq", "queue", "stats"], env=env, cwd=ctx)
    print(stats, file=sys.stderr)
    _log(t0, "`docker compose exec ingress mtaq queue stats`")

    def scraped() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            body = resp.read().decode()
        return (
            f"mtaq_messages_accepted_total {MESSAGES:.1f}" in body
            and f'mtaq_deliveries_total{{status="sent"}} {MESSAGES:.1f}' in body
        )

    _wait("exporter's /metrics counts them (accepted and sent)", scraped, 30, t0)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/", timeout=10) as resp:
        page = resp.read().decode()
    assert "Workers alive: 3" in page, page[:2000]
    elapsed = time.monotonic() - t0
    _log(t0, f"deployment test done in {elapsed:.0f}s")


HA_MESSAGES = 60


def test_ha_profile_loses_no_acknowledged_mail_when_the_primary_stops_answering(
    ha_deployment: dict[str, object],
) -> None:
    t0 = float(ha_deployment["t0"])  # type: ignore[arg-type]
    dc: list[str] = ha_deployment["dc"]  # type: ignore[assignment]
    env: dict[str, str] = ha_deployment["env"]  # type: ignore[assignment]
    ctx = Path(str(ha_deployment["ctx"]))
    smtp_port = int(ha_deployment["smtp_port"])  # type: ignore[call-overload]

    def healthy() -> bool:
        out = _run([*dc, "exec", "-T", "ingress", "mtaq", "health"], env=env, cwd=ctx)
        # and the Sentinels know each other (they meet through the primary): a failover needs two;
        # and each knows the replica (from the primary's INFO, every 10 s): a Sentinel that has
        # not seen it when the primary stops has nobody to promote, and never will
        quorum = _run(
            [*dc, "exec", "-T", "sentinel-1", "redis-cli", "-p", "26379", "sentinel", "ckquorum", "mtaq"],
            env=env,
            cwd=ctx,
        )
        replicas = [
            _run(
                [*dc, "exec", "-T", f"sentinel-{n}", "redis-cli", "-p", "26379", "sentinel", "replicas", "mtaq"],
                env=env,
                cwd=ctx,
            )
            for n in (1, 2, 3)
        ]
        return (
            "worker: ok" in out
            and "with 1 replica(s) online" in out
            and "OK 3 usable" in quorum
            and all("redis-replica" in r for r in replicas)
        )

    _wait(
        "`mtaq health`: a primary with 1 replica online, 3 Sentinels that know each other and the replica",
        healthy,
        180,
        t0,
    )

    acked: list[int] = []
    refusals: list[str] = []

    def send(i: int) -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with smtplib.SMTP("127.0.0.1", smtp_port, timeout=180) as s:
                    s.sendmail(
                        "ops@example.com", [f"user{i}@example.net"], f"Subject: ha {i}\r\nX-HA: {i}\r\n\r\nha\r\n"
                    )
                acked.append(i)
                return
            except smtplib.SMTPResponseException as e:
                refusals.append(f"{i}: {e.smtp_code}")
                assert e.smtp_code < 500, e
                time.sleep(1)  # a 4xx: again, as a real client would
            except (smtplib.SMTPException, OSError):
                time.sleep(1)

    for i in range(HA_MESSAGES // 3):
        send(i)
    # the primary's machine stops answering. (Paused, not killed: Docker drops a dead container's
    # name from its DNS, and Redis 7.0's Sentinel, which names the primary "redis", then stops at
    # "Failed to resolve hostname" and never fails over: on one host, compose can show a hung
    # machine, not a vanished one. docs/high-availability.md says so.)
    _run([*dc, "pause", "redis"], env=env, cwd=ctx)
    _log(t0, f"{len(acked)} acknowledged; the primary's container paused")
    threads = [threading.Thread(target=send, args=(i,)) for i in range(HA_MESSAGES // 3, HA_MESSAGES)]
    for t in threads:
        t.start()

    def promoted() -> bool:
        out = _run(
            [
                *dc,
                "exec",
                "-T",
                "sentinel-1",
                "redis-cli",
                "-p",
                "26379",
                "sentinel",
                "get-master-addr-by-name",
                "mtaq",
            ],
            env=env,
            cwd=ctx,
        )
        return "redis-replica" in out

    _wait("Sentinel promoted redis-replica", promoted, 120, t0)
    _run([*dc, "unpause", "redis"], env=env, cwd=ctx)  # the machine comes back: Sentinel makes it a replica
    for t in threads:
        t.join(300)
    _log(t0, f"{len(acked)} acknowledged in all ({len(refusals)} 4xx on the way)")
    assert sorted(acked) == list(range(HA_MESSAGES))

    def delivered() -> bool:
        out = _run(
            [*dc, "exec", "-T", "sink", "sh", "-c", "grep -h '^X-HA: ' /mail/* | sort -u | wc -l"], env=env, cwd=ctx
        )
        return int(out.strip()) >= HA_MESSAGES

    _wait(f"all {HA_MESSAGES} acknowledged messages delivered after the failover", delivered, 240, t0)
    total = _run([*dc, "exec", "-T", "sink", "sh", "-c", "ls /mail | wc -l"], env=env, cwd=ctx)
    _log(t0, f"sink holds {total.strip()} messages for {HA_MESSAGES} acknowledged (the rest are duplicates)")


PROMETHEUS_DOCKERFILE = """\
FROM {base}
COPY prometheus /bin/prometheus
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus", \\
     "--web.listen-address=:9090"]
"""


def _api(port: int, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}", timeout=10) as resp:
        body = json.loads(resp.read().decode())
    assert body.get("status") == "success", body
    data = body["data"]
    assert isinstance(data, dict)
    return data


def test_monitoring_profile_scrapes_the_exporter_and_loads_the_alert_rules(deployment: dict[str, object]) -> None:
    """The compose file's `monitoring` profile, Prometheus half: no registry is reachable here, so
    its image is the base image with Debian's own Prometheus binary (the package .ci/run installs
    for promtool; both Debian 12), started as the profile starts `prom/prometheus`: same config and
    rules mounted from deploy/prometheus/, same arguments. Grafana is not packaged by Debian: the
    dashboard's queries are checked against the exported series by test_monitoring_assets.py."""
    t0 = float(deployment["t0"])  # type: ignore[arg-type]
    dc: list[str] = deployment["dc"]  # type: ignore[assignment]
    env: dict[str, str] = dict(deployment["env"])  # type: ignore[call-overload]
    ctx = Path(str(deployment["ctx"]))
    binary = Path(os.path.realpath(require("prometheus")))
    image = f"{env['COMPOSE_PROJECT_NAME']}/prometheus:test"
    build = ctx / "prometheus-image"
    build.mkdir()
    shutil.copy2(binary, build / "prometheus")
    (build / "Dockerfile").write_text(PROMETHEUS_DOCKERFILE.format(base=BASE_IMAGE))
    _run(["docker", "build", "-q", "-t", image, str(build)], env={**env, "DOCKER_BUILDKIT": "0"}, timeout=300)
    port = free_port(["127.0.0.1"])
    env.update(MTAQ_PROMETHEUS_IMAGE=image, MTAQ_PROMETHEUS_PORT=str(port))
    try:
        _run([*dc, "--profile", "monitoring", "up", "-d", "--no-build", "--no-deps", "prometheus"], env=env, cwd=ctx)
        _log(t0, f"prometheus of the monitoring profile up on 127.0.0.1:{port} ({image})")

        def scraping() -> bool:
            targets = _api(port, "targets")["activeTargets"]
            assert isinstance(targets, list)
            return any(t["labels"]["job"] == "mtaq" and t["health"] == "up" for t in targets)

        _wait("Prometheus scrapes the exporter (job mtaq, up)", scraping, 90, t0)
        groups = _api(port, "rules")["groups"]
        assert isinstance(groups, list)
        rules = {r["name"] for g in groups for r in g["rules"]}
        with open(REPO / "deploy/prometheus/mtaq-alerts.yml") as f:
            written = set(re.findall(r"^\s*- alert: (\S+)", f.read(), re.M))
        assert written and rules == written, (rules, written)
        # a series of the dashboard, through Prometheus's own query API
        result = _api(port, "query?query=mtaq_workers_alive")["result"]
        assert isinstance(result, list) and result and float(result[0]["value"][1]) >= 1, result
        _log(t0, f"{len(rules)} alert rules loaded; mtaq_workers_alive = {result[0]['value'][1]}")
    finally:
        subprocess.run([*dc, "--profile", "monitoring", "rm", "-s", "-f", "prometheus"], env=env, cwd=ctx)
        subprocess.run(["docker", "image", "rm", "-f", image], capture_output=True)
