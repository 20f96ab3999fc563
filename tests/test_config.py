from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relayproxy.addresses import IPv6KeyStyle
from relayproxy.config import ConfigError, HostPort, load_config, parse_config

GOOD = """\
[store]
path = /var/lib/relayproxy/relayers.db   ; the Berkeley DB hash file
mode = 0640
group = root
ipv6_keys = both
min_interval = 30

[record]
exclude = 10.0.0.0/8, 192.168.0.0/16

[log]
format = json
target = file:/var/log/relayproxy.log
usernames = no

[listener:pop3]
protocol = pop3
listen = [::]:110
backend = 127.0.0.1:1110
tls = starttls
certificate = /etc/relayproxy/cert.pem
private_key = /etc/relayproxy/key.pem
require_tls = yes
proxy_protocol_in = 192.0.2.10/32
"""


def test_a_complete_file_becomes_typed_settings() -> None:
    config = parse_config(GOOD, "relayproxy.ini")
    assert config.store.mode == 0o640
    assert config.store.ipv6_keys is IPv6KeyStyle.BOTH
    assert config.store.min_interval == 30
    assert config.record.exclude == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("192.168.0.0/16"),
    )
    assert (config.log.format, config.log.usernames) == ("json", False)
    (listener,) = config.listeners
    assert listener.name == "pop3"
    assert listener.listen == HostPort("::", 110)
    assert str(listener.listen) == "[::]:110"
    assert listener.require_tls is True
    assert listener.preauth_timeout == 60.0


def test_defaults_apply_to_an_empty_file() -> None:
    config = parse_config("", "empty.ini")
    assert config.store.path == "/var/lib/relayproxy/relayers.db"
    assert config.store.ipv6_keys is IPv6KeyStyle.SENDMAIL
    assert config.listeners == ()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[store]\ncolour = blue\n", "f.ini: [store] colour: unknown key"),
        ("[stroe]\npath = /x\n", "f.ini: [stroe]: unknown section"),
        ("[store]\npath = x.db\n", "f.ini: [store] path: 'x.db' is not an absolute path"),
        ("[store]\nmode = 0755\n", "f.ini: [store] mode: 0755 makes a database file executable"),
        ("[store]\nmode = rw\n", "f.ini: [store] mode: 'rw' is not an octal mode"),
        ("[store]\ngroup = no-such-group\n", "f.ini: [store] group: no group named"),
        ("[store]\nipv6_keys = exim\n", "f.ini: [store] ipv6_keys: 'exim' is not one of"),
        ("[store]\nmin_interval = -1\n", "f.ini: [store] min_interval: '-1' is not a whole"),
        ("[record]\nexclude = 10.0.0.1/8\n", "f.ini: [record] exclude: '10.0.0.1/8' is not a"),
        ("[log]\ntarget = /var/log/x\n", "f.ini: [log] target: '/var/log/x' is not stderr"),
        ("[log]\nusernames = maybe\n", "f.ini: [log] usernames: 'maybe' is not yes or no"),
        (
            "[listener:a]\nprotocol = pop3\nlisten = 1.2.3.4:99999\nbackend = h:1\n",
            "f.ini: [listener:a] listen: port 99999 is outside",
        ),
        (
            "[listener:a]\nprotocol = smtp\nlisten = :110\nbackend = h:1\n",
            "f.ini: [listener:a] protocol: 'smtp' is not one of pop3, imap",
        ),
        ("[listener:a]\nprotocol = pop3\n", "f.ini: [listener:a] listen: missing"),
        (
            "[listener:a]\nprotocol = pop3\nlisten = h:1\nbackend = h:2\ntls = implicit\n",
            "f.ini: [listener:a] certificate: missing (required with tls = implicit)",
        ),
        (
            "[listener:a]\nprotocol = pop3\nlisten = h:1\nbackend = h:2\nrequire_tls = yes\n",
            "f.ini: [listener:a] require_tls: yes needs tls",
        ),
        (
            "[listener:a]\nprotocol=pop3\nlisten=h:1\nbackend=h:2\n"
            "[listener:b]\nprotocol=imap\nlisten=h:1\nbackend=h:3\n",
            "f.ini: [listener:b] listen: h:1 is also [listener:a]",
        ),
        ("[store]\npath = /a\npath = /b\n", "f.ini"),
        ("path = /a\n", "f.ini"),
    ],
)
def test_every_problem_names_file_section_key_and_what_is_wrong(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, "f.ini")
    assert any(line.startswith(expected) for line in error.value.problems), error.value.problems


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("[store]\nmode = 9\ncolour = red\n[log]\nformat = xml\n", "f.ini")
    assert len(error.value.problems) == 3


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.ini: cannot read: No such file"):
        load_config(str(tmp_path / "missing.ini"))


LISTENER = "[listener:a]\nprotocol = pop3\nlisten = 127.0.0.1:110\n"


def test_a_listener_takes_several_backends_in_order_with_a_balance_and_a_retry() -> None:
    config = parse_config(
        LISTENER + "backend = 10.0.0.1:110, mail.example:1110 ,[2001:db8::1]:110\n"
        "backend_balance = roundrobin\nbackend_retry = 2.5\n",
        "f.ini",
    )
    (listener,) = config.listeners
    assert listener.backend == (
        HostPort("10.0.0.1", 110),
        HostPort("mail.example", 1110),
        HostPort("2001:db8::1", 110),
    )
    assert (listener.backend_balance, listener.backend_retry) == ("roundrobin", 2.5)


def test_one_backend_is_a_list_of_one_in_failover_order_retried_after_30_seconds() -> None:
    (listener,) = parse_config(LISTENER + "backend = 127.0.0.1:1110\n", "f.ini").listeners
    assert listener.backend == (HostPort("127.0.0.1", 1110),)
    assert (listener.backend_balance, listener.backend_retry) == ("first", 30.0)


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        ("backend =\n", "f.ini: [listener:a] backend: is empty (one or more host:port"),
        ("backend = h:1,\n", "f.ini: [listener:a] backend: 'h:1,' has an empty entry"),
        ("backend = h:1, h\n", "f.ini: [listener:a] backend: 'h' is not host:port"),
        ("backend = h:1, h:0\n", "f.ini: [listener:a] backend: port 0 is outside 1..65535"),
        ("backend = [::1]:1, [0::1]:1\n", "f.ini: [listener:a] backend: [0::1]:1 is listed twice"),
        ("backend = H:1, h:2, h:1\n", "f.ini: [listener:a] backend: h:1 is listed twice"),
        ("backend = h:1\nbackend_balance = random\n", "f.ini: [listener:a] backend_balance: "),
        ("backend = h:1\nbackend_retry = 0\n", "f.ini: [listener:a] backend_retry: '0' must"),
        ("backend_retry = 5\n", "f.ini: [listener:a] backend: missing"),
    ],
)
def test_a_bad_backend_list_names_the_entry_and_what_is_wrong(lines: str, expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(LISTENER + lines, "f.ini")
    assert any(line.startswith(expected) for line in error.value.problems), error.value.problems
