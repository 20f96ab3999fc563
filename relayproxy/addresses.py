"""Client addresses and the relayers.db keys the MTAs look up for them.

Owns: strict parsing of an address typed by an administrator or reported by
a socket, and the key forms written for it. Never touches the database.

Key forms (what each MTA looks up):

* IPv4: the dotted quad, as sendmail's ``${client_addr}`` and Postfix's
  client address both hold it. An IPv4-mapped IPv6 peer (``::ffff:a.b.c.d``,
  what a dual-stack socket reports for an IPv4 client) is recorded as IPv4.
* IPv6, ``postfix``: the compressed form (``2001:db8::1``) exactly as the C
  library's ``inet_ntop()`` writes it, which is what Postfix's smtpd (and
  Exim's ``$sender_host_address``) hold. Python's ``ipaddress`` differs for
  IPv4-compatible addresses (``::102:304`` where ``inet_ntop`` writes
  ``::1.2.3.4``), so the key comes from ``socket.inet_ntop``.
* IPv6, ``sendmail``: ``ipv6:`` followed by the uncompressed form with no
  leading zeros (``ipv6:2001:db8:0:0:0:0:0:1``). sendmail's ``anynet_ntop()``
  (sendmail/daemon.c) prefixes ``IPv6:``, and with ``IPV6_FULL`` (defined to 1
  in sendmail.h, listed by Debian's ``sendmail -d0.1``) ``sm_inet6_ntop()``
  prints the eight groups with ``"%x:%x:%x:%x:%x:%x:%x:%x"``. The key is
  lower case because ``db_map_lookup()`` (sendmail/map.c) folds the lookup
  key to lower case unless the map has ``-f``, and makemap folds the keys it
  writes in the same way: ``IPv6:...`` would never match.
"""

from __future__ import annotations

import enum
import ipaddress
import re
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

SENDMAIL_IPV6_PREFIX = "ipv6:"

_DOTTED_QUAD = re.compile(r"[0-9]+(?:\.[0-9]+){3}")


class AddressError(ValueError):
    """An address that cannot be a client address; the message says why."""


class IPv6KeyStyle(enum.Enum):
    """Which MTA's spelling of an IPv6 client the store writes."""

    SENDMAIL = "sendmail"
    POSTFIX = "postfix"
    BOTH = "both"


def parse_client_address(text: str) -> IPAddress:
    """Parse an IPv4 or IPv6 address strictly, reducing IPv4-mapped IPv6 to IPv4.

    Accepts the sendmail spelling (``IPv6:...``) too, so an address copied
    from a sendmail log or a ``vsmtprelay dump`` can be given back.
    """
    if not text:
        raise AddressError("empty address")
    if "\x00" in text:
        raise AddressError("address contains a NUL byte")
    if text != text.strip() or any(c.isspace() for c in text):
        raise AddressError("address contains whitespace")
    if not text.isascii():
        raise AddressError("address contains non-ASCII characters")
    body = text
    if body[: len(SENDMAIL_IPV6_PREFIX)].lower() == SENDMAIL_IPV6_PREFIX:
        body = body[len(SENDMAIL_IPV6_PREFIX) :]
        if ":" not in body:
            raise AddressError("'IPv6:' prefix without an IPv6 address")
    if ":" in body:
        return _parse_ipv6(body)
    return _parse_ipv4(body)


def _parse_ipv4(text: str) -> ipaddress.IPv4Address:
    if not _DOTTED_QUAD.fullmatch(text):
        if re.fullmatch(r"[0-9.]+", text):
            raise AddressError("an IPv4 address needs exactly four dot-separated decimal numbers")
        raise AddressError("not an IP address (host names are not accepted)")
    for part in text.split("."):
        if len(part) > 1 and part.startswith("0"):
            # inet_aton() would read 010 as octal 8: refuse rather than guess.
            raise AddressError(f"leading zero in {part!r} (ambiguous: octal or decimal?)")
        if int(part) > 255:
            raise AddressError(f"{part} is larger than 255")
    return ipaddress.IPv4Address(text)


def _parse_ipv6(text: str) -> IPAddress:
    if "%" in text:
        raise AddressError("a zone index (%...) is not part of a client address")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError as exc:
        raise AddressError(f"not a valid IPv6 address ({exc})") from None
    mapped = address.ipv4_mapped
    return mapped if mapped is not None else address


def peer_address(host: str) -> IPAddress:
    """The client address of a socket peer, as the kernel reported it.

    Unlike administrator input, a link-local peer may carry a zone index,
    which identifies an interface of ours and is no part of the key.
    """
    return parse_client_address(host.split("%", 1)[0])


def sendmail_ipv6(address: ipaddress.IPv6Address) -> str:
    """The key sendmail looks up for an IPv6 peer: ``${client_addr}``, case-folded."""
    groups = (int.from_bytes(address.packed[i : i + 2], "big") for i in range(0, 16, 2))
    return SENDMAIL_IPV6_PREFIX + ":".join(f"{group:x}" for group in groups)


def postfix_ipv6(address: ipaddress.IPv6Address) -> str:
    """The key Postfix and Exim look up for an IPv6 peer: the C library's inet_ntop."""
    return socket.inet_ntop(socket.AF_INET6, address.packed)


def relayer_keys(address: IPAddress, style: IPv6KeyStyle) -> tuple[str, ...]:
    """The keys under which the MTAs look ``address`` up, per ``[store] ipv6_keys``."""
    if isinstance(address, ipaddress.IPv4Address):
        return (str(address),)
    if style is IPv6KeyStyle.SENDMAIL:
        return (sendmail_ipv6(address),)
    if style is IPv6KeyStyle.POSTFIX:
        return (postfix_ipv6(address),)
    return (sendmail_ipv6(address), postfix_ipv6(address))


def all_relayer_keys(address: IPAddress) -> tuple[str, ...]:
    """Every key any style may have written for ``address``: what a delete removes."""
    return relayer_keys(address, IPv6KeyStyle.BOTH)


def lookup_keys(text: str, style: IPv6KeyStyle) -> tuple[str, ...]:
    """The store keys an MTA's lookup key ``text`` may be under (empty: not an address).

    Folds what the MTAs send to what ``[store] ipv6_keys`` writes: sendmail's
    ``IPv6:2001:db8:0:0:0:0:0:1`` in any case (a socket map is not folded as
    its hash map is), Postfix's compressed ``2001:db8::1``, an IPv4-mapped
    ``::ffff:192.0.2.1``. With ``both``, either key is there.
    """
    try:
        address = parse_client_address(text)
    except AddressError:
        return ()
    return relayer_keys(address, style)
