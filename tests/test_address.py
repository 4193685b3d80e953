"""The one address parser: host:port, [v6]:port and lists; bad forms name the expected one."""

from __future__ import annotations

import pytest

from defer.address import format_address, parse_address, parse_address_list
from defer.errors import UsageError


@pytest.mark.parametrize("text, want", [
    ("127.0.0.1:7000", ("127.0.0.1", 7000)), ("node-3:1", ("node-3", 1)),
    ("[::1]:7000", ("::1", 7000)), ("[fe80::2]:65535", ("fe80::2", 65535)),
])
def test_good_addresses(text, want):
    assert parse_address(text) == want
    assert parse_address(format_address(*want)) == want


@pytest.mark.parametrize("text", ["", "host", "host:", ":7000", "host:0", "host:70000",
                                  "::1:7000", "host:port", "[::1]"])
def test_bad_addresses_show_the_form(text):
    with pytest.raises(UsageError, match=r"expected host:port, e.g. 127.0.0.1:7000 or \[::1\]"):
        parse_address(text)


def test_lists():
    assert parse_address_list(" a:1, [::1]:2 ,") == ["a:1", "[::1]:2"]
    assert parse_address_list("") == []
