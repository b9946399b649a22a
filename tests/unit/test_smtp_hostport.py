"""The one ``[host]:port`` parser (common/smtp/hostport.py): listening addresses, DNS servers, the
relayhost and next hops, with the rules Postfix gives them."""

from __future__ import annotations

import pytest

from common.mx import local_addresses
from common.routing import next_hop
from common.settings import Settings
from common.smtp.hostport import (
    HostPort,
    format_hostport,
    literal_hop,
    parse_destination,
    parse_hostport,
    split_hostport,
)


@pytest.mark.parametrize(
    ("destination", "expected"),
    [
        ("example.com", ("example.com", 25, False)),
        ("example.com:587", ("example.com", 587, False)),
        ("[mail.example.com]", ("mail.example.com", 25, True)),
        ("[mail.example.com]:2526", ("mail.example.com", 2526, True)),
        ("[127.0.0.5]:2526", ("127.0.0.5", 2526, True)),
        ("[::1]:2526", ("::1", 2526, True)),
        ("[IPv6:::1]", ("::1", 25, True)),
        (" [127.0.0.5] ", ("127.0.0.5", 25, True)),
    ],
)
def test_parse_destination(destination: str, expected: tuple[str, int, bool]) -> None:
    assert parse_destination(destination, 25) == expected


@pytest.mark.parametrize("destination", ["[127.0.0.1", "[]", "[host]x", "[host]:", "[host]:0", "[host]:70000", "h:p"])
def test_parse_destination_rejects_nonsense(destination: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_destination(destination, 25)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:2525", ("127.0.0.1", 2525)),
        ("127.0.0.1", ("127.0.0.1", 53)),
        ("[::1]:5353", ("::1", 5353)),
        ("::1", ("::1", 53)),  # a bare IPv6 address has no port
        ("[IPv6:2001:db8::1]", ("2001:db8::1", 53)),
        ("localhost:0", ("localhost", 0)),  # port 0: any, to listen on
        (" 10.0.0.1:53 ", ("10.0.0.1", 53)),
    ],
)
def test_parse_hostport(value: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(value, 53) == expected


@pytest.mark.parametrize("value", ["host:x", "host:", "host:65536", "[::1", "[::1]x"])
def test_parse_hostport_says_what_is_wrong(value: str) -> None:
    with pytest.raises(ValueError, match="bad") as e:
        parse_hostport(value, 53)
    assert repr(value) in str(e.value)


def test_split_says_literal() -> None:
    assert split_hostport("[a.test]:26", 25) == HostPort("a.test", 26, True)
    assert split_hostport("a.test:26", 25) == HostPort("a.test", 26, False)


@pytest.mark.parametrize(
    ("relayhost", "hop"),
    [
        ("smart.test", "[smart.test]"),
        ("smart.test:2525", "[smart.test]:2525"),
        ("[10.0.0.1]:26", "[10.0.0.1]:26"),
        ("[IPv6:::1]", "[IPv6:::1]"),  # as written: jobs are grouped by this spelling
    ],
)
def test_literal_hop(relayhost: str, hop: str) -> None:
    assert literal_hop(relayhost) == hop
    # and what routes a recipient, what parses it as a next hop and what the MX lookup reads agree
    assert next_hop("a@b.test", relayhost) == hop
    assert parse_destination(hop, 25)[2] is True


def test_format_hostport_brackets_ipv6_only() -> None:
    assert format_hostport("::1", 25) == "[::1]:25"
    assert format_hostport("127.0.0.1", 25) == "127.0.0.1:25"
    assert split_hostport(format_hostport("::1", 25), 0) == HostPort("::1", 25, True)


def test_settings_and_loop_detection_read_listen_addresses_with_it() -> None:
    s = Settings(listen="[::1]:2600", dns_servers="127.0.0.1:5353, 127.0.0.2")
    assert s.listen_addr == ("::1", 2600)
    assert s.dns_server_list == [("127.0.0.1", 5353), ("127.0.0.2", 53)]
    assert local_addresses("[::1]:2600") == ["::1"]
    assert local_addresses("127.0.0.9:25") == ["127.0.0.9"]


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("listen", "127.0.0.1:", "listen: bad port in '127.0.0.1:'"),
        ("metrics_listen", "[::1", "metrics_listen: bad address '[::1'"),
        ("dns_servers", "127.0.0.1:53,127.0.0.2:x", "dns_servers: bad port in '127.0.0.2:x'"),
        ("relayhost", "[smart.test]:0", "relayhost: bad port in destination '[smart.test]:0'"),
    ],
)
def test_a_bad_address_setting_is_one_line_at_start(setting: str, value: str, says: str) -> None:
    with pytest.raises(ValueError) as e:
        Settings.from_env({f"MTAQ_{setting.upper()}": value})
    assert str(e.value).startswith(says) and "\n" not in str(e.value)
