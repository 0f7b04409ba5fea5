"""Pure parts of the QEMU bridge: QMP addresses and the order in which blocks are mirrored."""

from __future__ import annotations

import socket

import pytest

from vmm_shim.client import next_block_run
from vmm_shim.qemu_qmp import parse_qmp_address


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("unix:/run/vm1.sock", (socket.AF_UNIX, "/run/vm1.sock")),
        ("unix:/run/vm1.sock,server=on,wait=off", (socket.AF_UNIX, "/run/vm1.sock")),
        ("127.0.0.1:4444", (socket.AF_INET, ("127.0.0.1", 4444))),
        ("tcp:localhost:4444", (socket.AF_INET, ("localhost", 4444))),
        ("[::1]:4444", (socket.AF_INET6, ("::1", 4444))),
    ],
)
def test_qmp_addresses_are_read_as_qemus_qmp_option_spells_them(
    address: str, expected: tuple[int, object]
) -> None:
    """``unix:PATH`` (options after a comma ignored), ``HOST:PORT`` and ``tcp:HOST:PORT``."""
    assert expected == parse_qmp_address(address)


@pytest.mark.parametrize("address", ["", "unix:", "/run/vm1.sock", "host:", "host:0", "h:99999"])
def test_a_malformed_qmp_address_is_a_value_error_quoting_it(address: str) -> None:
    """Anything else is refused, naming the address."""
    with pytest.raises(ValueError, match=f"invalid QMP address {address!r}"):
        parse_qmp_address(address)


def test_plugging_takes_the_lowest_unplugged_blocks_upwards() -> None:
    """Like Linux's driver: the first unplugged block, extended while unplugged, up to ``want``."""
    plugged = [True, False, False, True, False, False, False]
    assert (1, 2) == next_block_run(plugged, True, 5)
    assert (1, 1) == next_block_run(plugged, True, 1)
    assert (4, 3) == next_block_run([True] * 4 + [False] * 3, True, 8)


def test_unplugging_takes_the_highest_plugged_blocks_downwards() -> None:
    """The last plugged block, extended downwards while plugged, up to ``want``."""
    plugged = [True, True, False, True, True, True, False]
    assert (3, 3) == next_block_run(plugged, False, 5)
    assert (4, 2) == next_block_run(plugged, False, 2)
    assert (0, 2) == next_block_run([True, True, False], False, 9)
