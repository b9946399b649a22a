"""Certificate checks against policies (worker/tlspolicy.py), on real trustme certificates, and which
policy an MX gets (worker/tlsgate.py): DANE before MTA-STS."""

from __future__ import annotations

import datetime
import hashlib
import shutil
import subprocess
from pathlib import Path
from typing import cast

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from common.mx import Target
from worker.dane import TLSALookup
from worker.mtasts import STSPolicy
from worker.tlsgate import DestinationTLS
from worker.tlspolicy import TLSA, Failure, Requirement, TrustAnchors, check_chain, spki, tlsa_matches

MX = "mx.a.test"
DANE = Requirement("dane", True, "a.test")
STS = Requirement("mta-sts", True, "a.test")


def der_chain(leaf: trustme.LeafCert) -> list[bytes]:
    return [x509.load_pem_x509_certificate(p.bytes()).public_bytes(Encoding.DER) for p in leaf.cert_chain_pems]


def cert(der: bytes) -> x509.Certificate:
    return x509.load_der_x509_certificate(der)


def record(usage: int, selector: int, mtype: int, c: x509.Certificate) -> TLSA:
    data = c.public_bytes(Encoding.DER) if selector == 0 else spki(c)
    if mtype == 1:
        data = hashlib.sha256(data).digest()
    elif mtype == 2:
        data = hashlib.sha512(data).digest()
    return TLSA(usage, selector, mtype, data)


def anchors_for(ca: trustme.CA, tmp_path: Path) -> TrustAnchors:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return TrustAnchors(str(path))


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ee_matches_the_leaf_whatever_its_name_and_dates(selector: int, mtype: int) -> None:
    ca = trustme.CA()
    # another name, long expired: DANE-EE(3) pins the key and ignores both (RFC 7672 §3.1.1)
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    chain = der_chain(ca.issue_cert("other.test", not_before=past, not_after=past + datetime.timedelta(days=1)))
    req = Requirement("dane", True, "a.test", (record(3, selector, mtype, cert(chain[0])),))
    assert check_chain(req, MX, chain, None) is None
    rogue = der_chain(trustme.CA().issue_cert(MX))
    failure = check_chain(req, MX, rogue, None)
    assert failure is not None and failure.result_type == "tlsa-invalid" and "DANE" in failure.text


@pytest.mark.parametrize("selector", [0, 1])
@pytest.mark.parametrize("mtype", [0, 1, 2])
def test_dane_ta_anchors_a_validation_for_the_mx_name(selector: int, mtype: int) -> None:
    root = trustme.CA()
    issuer = root.create_child_ca()  # the TA is the intermediate the server sends in its chain
    chain = der_chain(issuer.issue_cert(MX))
    assert len(chain) >= 2
    ta = next(c for c in map(cert, chain[1:]) if c.subject == cert(chain[0]).issuer)
    req = Requirement("dane", True, "a.test", (record(2, selector, mtype, ta),))
    assert check_chain(req, MX, chain, None) is None
    # DANE-TA checks the name: the same chain for another host fails
    assert check_chain(req, "mx.b.test", chain, None) is not None
    # a leaf from another issuer does not chain to the TA
    assert check_chain(req, MX, der_chain(trustme.CA().issue_cert(MX)), None) is not None


def test_unusable_tlsa_usages_match_nothing() -> None:
    chain = der_chain(trustme.CA().issue_cert(MX))
    for usage in (0, 1):  # PKIX-TA, PKIX-EE: RFC 7672 §3.1.3
        r = record(usage, 1, 1, cert(chain[0]))
        assert not r.usable and not tlsa_matches(r, cert(chain[0]))
    assert not TLSA(3, 2, 1, b"").usable and not TLSA(3, 1, 3, b"").usable


def test_mta_sts_wants_a_trusted_certificate_for_the_mx_name(tmp_path: Path) -> None:
    ca = trustme.CA()
    anchors = anchors_for(ca, tmp_path)
    assert check_chain(STS, MX, der_chain(ca.issue_cert(MX)), anchors) is None
    assert check_chain(STS, MX, der_chain(ca.issue_cert("*.a.test")), anchors) is None
    wrong = check_chain(STS, MX, der_chain(ca.issue_cert("mx.b.test")), anchors)
    assert wrong is not None and wrong.result_type == "certificate-host-mismatch"
    assert "MTA-STS policy of a.test" in wrong.text
    rogue = check_chain(STS, MX, der_chain(trustme.CA().issue_cert(MX)), anchors)
    assert rogue is not None and rogue.result_type == "certificate-not-trusted"
    past = datetime.datetime(2001, 1, 1, tzinfo=datetime.UTC)
    old = ca.issue_cert(MX, not_before=past, not_after=past + datetime.timedelta(days=1))
    expired = check_chain(STS, MX, der_chain(old), anchors)
    assert expired is not None and expired.result_type == "certificate-expired"
    assert check_chain(STS, MX, [], anchors) is not None
    testing = check_chain(Requirement("mta-sts", False, "a.test"), MX, der_chain(trustme.CA().issue_cert(MX)), anchors)
    assert testing is not None and "(testing)" in testing.text


def test_no_policy_accepts_anything() -> None:
    assert check_chain(Requirement(), MX, [], None) is None


def test_a_bundle_without_certificates_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    with pytest.raises(ValueError, match="no PEM certificate"):
        TrustAnchors(str(bad)).load()


class FakeTLSA:
    def __init__(self, found: dict[str, Requirement | None]) -> None:
        self.found = found
        self.asked: list[str] = []

    def requirement(self, host: str, port: int, domain: str) -> Requirement | None:
        self.asked.append(host)
        return self.found.get(host)


def target(host: str) -> Target:
    return Target(host, "127.0.0.2", 25, 10)


def test_dane_wins_over_mta_sts_and_mta_sts_picks_the_mx(tmp_path: Path) -> None:
    dane_req = Requirement("dane", True, "a.test", (TLSA(3, 1, 1, b"x" * 32),))
    lookup = FakeTLSA({"mx1.a.test": dane_req})
    sts = STSPolicy("enforce", ("mx1.a.test", "*.mail.a.test"), 86400, "1")
    dest = DestinationTLS("a.test", TrustAnchors(), sts, cast(TLSALookup, lookup))
    assert dest.require(target("mx1.a.test")) is dane_req
    assert dest.require(target("mx1.a.test")) is dane_req and lookup.asked == ["mx1.a.test"]  # asked once
    assert dest.require(target("x.mail.a.test")) == Requirement("mta-sts", True, "a.test")
    refused = dest.require(target("evil.test"))
    assert isinstance(refused.refuse, Failure) and "evil.test is not in the policy" in refused.refuse.text
    testing = DestinationTLS("a.test", TrustAnchors(), STSPolicy("testing", ("mx1.a.test",), 60, "1"))
    assert testing.require(target("evil.test")) == Requirement("mta-sts", False, "a.test")
    none = DestinationTLS("a.test", TrustAnchors(), STSPolicy("none", (), 60, "1"))
    assert none.require(target("evil.test")) == Requirement()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_tlsa_records_computed_by_openssl_match(tmp_path: Path) -> None:
    """TLSA data as DANE operators make it (RFC 7671 §A: openssl x509/pkey | sha256), not by our code."""
    leaf = trustme.CA().issue_cert(MX)
    pem = tmp_path / "leaf.pem"
    pem.write_bytes(leaf.cert_chain_pems[0].bytes())

    def run(*cmds: list[str]) -> bytes:
        data = pem.read_bytes()
        for cmd in cmds:
            data = subprocess.run(cmd, input=data, capture_output=True, check=True).stdout
        return data

    full = run(["openssl", "x509", "-outform", "DER"], ["openssl", "dgst", "-sha256", "-binary"])
    key = run(
        ["openssl", "x509", "-noout", "-pubkey"],
        ["openssl", "pkey", "-pubin", "-outform", "DER"],
        ["openssl", "dgst", "-sha512", "-binary"],
    )
    c = cert(der_chain(leaf)[0])
    assert tlsa_matches(TLSA(3, 0, 1, full), c) and tlsa_matches(TLSA(3, 1, 2, key), c)
    assert not tlsa_matches(TLSA(3, 1, 2, full), c)  # a certificate digest is not a key digest
