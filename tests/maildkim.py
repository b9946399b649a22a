"""Perl's Mail::DKIM (Debian's libmail-dkim-perl, installed by .ci/run): a second DKIM verifier we did
not write, asking a loopback ZoneServer for the keys (Net::DNS takes a port).

Why not OpenDKIM's opendkim-testmsg: the one in Debian 12 (2.11.0~beta2-8+deb12u1) answers every
input, an unsigned three-line message included, with ``dkim_chunk(): Syntax error`` (exit 70), and it
can only ask the system resolver. Mail::DKIM 1.20230212 verifies rsa-sha256; it reports
ed25519-sha256 as an unsupported algorithm, so Ed25519 signatures are checked with dkimpy.
"""

from __future__ import annotations

import subprocess

from tests.dnsserver import ZoneServer
from tests.tools import missing, require

__all__ = ["maildkim_verdicts", "require_maildkim"]

_VERIFY = r"""
use strict; use warnings;
use Mail::DKIM::Verifier; use Mail::DKIM::DNS; use Net::DNS::Resolver;
my ($host, $port) = @ARGV;
Mail::DKIM::DNS::resolver(Net::DNS::Resolver->new(nameservers => [$host], port => $port, recurse => 0,
                                                  udp_timeout => 5, tcp_timeout => 5));
my $dkim = Mail::DKIM::Verifier->new();
binmode STDIN; local $/; my $m = <STDIN>; $dkim->PRINT($m); $dkim->CLOSE;
foreach my $s ($dkim->signatures) { print $s->domain, " ", $s->algorithm, " ", $s->result_detail, "\n"; }
"""


def require_maildkim() -> None:
    """Skip (saying why) where Mail::DKIM is not installed; where .ci/run promised it, fail
    (tests/tools.py)."""
    perl = require("perl")
    probe = subprocess.run([perl, "-MMail::DKIM::Verifier", "-MNet::DNS", "-e", "1"], capture_output=True)
    if probe.returncode != 0:
        missing("Perl's Mail::DKIM (Debian libmail-dkim-perl) is not installed (.ci/run installs it)")


def maildkim_verdicts(message: bytes, zone: ZoneServer) -> list[str]:
    """``"domain algorithm result"`` per signature, e.g. ``"example.com rsa-sha256 pass"``."""
    host, port = zone.address
    p = subprocess.run(
        ["perl", "-e", _VERIFY, host, str(port)], input=message, capture_output=True, timeout=60, check=True
    )
    return p.stdout.decode().splitlines()
