"""Postfix baselines for the benchmark (optional: only when Postfix's programs are installed).

- ``PostfixInstance``: a private, throw-away Postfix instance (its own config_directory,
  queue_directory and data_directory under a temporary directory, smtpd on a loopback port, no
  chroot, logging to a file through postlogd) that relays everything to ``relayhost=[127.0.0.1]:PORT``
  (the benchmark's aiosmtpd sink). Postfix fsyncs each queue file before it answers 250, as mtaq's
  Redis does with ``appendfsync always``. The system's own Postfix (/etc/postfix) is not touched.

    python -m bench.throughput --postfix

``missing()`` says why a baseline cannot run (None when it can); the benchmark then skips it.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

__all__ = ["PostfixInstance", "missing"]

POSTFIX = "postfix"
POSTCONF = "postconf"


def missing() -> str | None:
    for prog in (POSTFIX, POSTCONF):
        if shutil.which(prog) is None:
            return f"{prog} not found (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root (master(8) starts as root, drops to mail_owner)"
    return None


def _postconf(name: str) -> str:
    out = subprocess.run([POSTCONF, "-dh", name], capture_output=True, text=True, check=True)
    return out.stdout.strip()


_MASTER_CF = """\
# service type  private unpriv  chroot  wakeup  maxproc command + args
{listen} inet  n       -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance:
    """A private Postfix on 127.0.0.1:port relaying all mail to [127.0.0.1]:relay_port."""

    def __init__(
        self,
        base: Path,
        port: int,
        relay_port: int,
        *,
        process_limit: int = 100,
        transports: dict[str, str] | None = None,
    ) -> None:
        self.base = base.absolute()
        self.port = port
        self.relay_port = relay_port
        self.process_limit = process_limit
        # domain -> nexthop ("smtp:[127.0.0.10]:2525"): a private Postfix cannot be pointed at our
        # loopback DNS server (it resolves through the system's resolver), so the slow-destination
        # load routes each domain with transport_maps instead of MX lookups
        self.transports = transports
        self.config_dir = self.base / "etc"
        self.queue_dir = self.base / "spool"
        self.data_dir = self.base / "lib"
        self.log_file = self.base / "maillog"

    def main_cf(self) -> str:
        params = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "daemon_directory": _postconf("daemon_directory"),
            "shlib_directory": _postconf("shlib_directory"),
            "meta_directory": _postconf("meta_directory"),
            "command_directory": _postconf("command_directory"),
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "postfix-bench.test",
            "mydomain": "postfix-bench.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[127.0.0.1]:{self.relay_port}" if not self.transports else "",
            "transport_maps": f"texthash:{self.config_dir / 'transport'}" if self.transports else "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "smtp_dns_support_level": "disabled",
            "smtputf8_enable": "no",
            "biff": "no",
            "default_process_limit": str(self.process_limit),
            "maillog_file": str(self.log_file),
            "maillog_file_prefixes": str(self.base),
            "syslog_name": "postfix-bench",
            "multi_instance_enable": "no",
        }
        return "".join(f"{k} = {v}\n" for k, v in params.items())

    def setup(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        for parent in self.base.parents:  # mail_owner must reach base: a mkdtemp() parent is 0700
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
        for d in (self.base, self.config_dir, self.queue_dir, self.data_dir):
            d.mkdir(parents=True, exist_ok=True)
            d.chmod(0o755)  # a mkdtemp() directory is 0700: postfix (mail_owner) must traverse it
        (self.config_dir / "main.cf").write_text(self.main_cf())
        (self.config_dir / "master.cf").write_text(_MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        if self.transports:
            (self.config_dir / "transport").write_text("".join(f"{d} {t}\n" for d, t in self.transports.items()))
        # postfix-files lists what `postfix set-permissions`/create-missing manage; it lives in
        # meta_directory, which stays the system's
        shutil.chown(self.data_dir, "postfix", "postfix")

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [POSTFIX, "-c", str(self.config_dir), *args], capture_output=True, text=True, check=check, timeout=60
        )

    def start(self) -> None:
        self.setup()
        r = self._postfix("start", check=False)
        if r.returncode != 0:
            raise RuntimeError(
                f"postfix -c {self.config_dir} start failed ({r.returncode}): {(r.stderr or r.stdout).strip()}"
            )

    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if Path(f"/proc/{pid}").exists() else None

    def stop(self) -> None:
        self._postfix("stop", check=False)
        # master(8) exits after its children; wait for the pid file to go
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + 20
        while pid_file.exists() and time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, 0)
            except (ValueError, IndexError, ProcessLookupError, FileNotFoundError):
                break
            time.sleep(0.1)

    def queued(self) -> int:
        """Messages still in the queue (files under incoming/active/deferred/maildrop)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _root, _dirs, files in os.walk(self.queue_dir / sub):
                n += len(files)
        return n

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"

    def __enter__(self) -> PostfixInstance:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
