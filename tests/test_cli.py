"""The CLI and the Python API on bad input: one clear line and exit code 2 (CLI), one of
our exceptions (API); never a traceback or a hang."""

from __future__ import annotations

import pytest
import torch
from support.nodes import Node
from support.sockets import short_tmpdir

from client import HarvestError, InvalidArgument, NoCapacity, NotFound, Unavailable, connect
from harvestd.sizes import MiB


def one_clear_line(result) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harvestd: error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def no_node():
    return Node(short_tmpdir())


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["lenders", "--json"],
        ["leases"],
        ["revoke", "lease-x"],
        ["drain", "l"],
        ["stop"],
        ["reclaim", "--lender", "l", "--bytes", "1"],
    ],
)
def test_no_node_running(no_node, command):
    line = one_clear_line(no_node.cli(*command))
    assert "no Harvest node" in line


@pytest.mark.parametrize(
    "args, words",
    [
        (["reclaim", "--lender", "x", "--bytes", "-5"], "not a size"),
        (["reclaim", "--lender", "x", "--bytes", "lots"], "not a size"),
        (["reclaim", "--lender", "x"], "--bytes"),
        (["start", "--host-bytes", "0"], "must be positive"),
        (["start", "--host-bytes", "-1GiB"], "not a size"),
        (["start", "--reserve", "150%"], "between 0% and 100%"),
        (["start", "--backend", "tpu"], "tpu"),
        (["start", "--ttl", "-3"], "positive"),
        (["start", "--peak-window", "nope"], "expected seconds"),
        (["start", "--peak-window", "-1"], "0 or a positive number"),
        (["frobnicate"], "frobnicate"),
    ],
)
def test_bad_arguments(no_node, args, words):
    assert words in one_clear_line(no_node.cli(*args))


def test_bad_input_against_a_running_node(plain_node):
    assert "no live lease" in one_clear_line(plain_node.cli("revoke", "lease-nope"))
    assert "no lender" in one_clear_line(plain_node.cli("drain", "nobody"))
    assert "no lender" in one_clear_line(
        plain_node.cli("reclaim", "--lender", "nobody", "--bytes", "1MiB")
    )
    huge = plain_node.cli("reclaim", "--lender", plain_node.id, "--bytes", "999999TiB")
    assert "reclaim size" in one_clear_line(huge)
    assert "timeout" in one_clear_line(plain_node.cli("drain", plain_node.id, "--timeout", "-1"))


def test_tables_and_json_agree(plain_node):
    with plain_node.connect() as client, client.lease(3 * MiB) as lease:
        rows = plain_node.json("leases")
        assert [r["id"] for r in rows] == [lease.id]
        row = rows[0]
        assert (row["lender"], row["nbytes"], row["state"]) == (plain_node.id, 3 * MiB, "granted")
        assert row["holder_pid"] > 0 and row["expires_at"] > 0
        table = plain_node.cli("leases", check=True).stdout
        assert lease.id in table and "3.0 MiB" in table and "granted" in table
        status = plain_node.cli("status", check=True).stdout
        assert "1 active" in status and "3.0 MiB granted" in status


def test_api_errors(plain_node):
    with pytest.raises(Unavailable):
        connect(state_dir=str(short_tmpdir()))
    with plain_node.connect() as client:
        for bad in (0, -1, 2.5, "1MiB", True):
            with pytest.raises(InvalidArgument):
                client.lease(bad)
        with pytest.raises(InvalidArgument):
            client.lease(MiB, ttl=-1)
        with pytest.raises(NoCapacity):
            client.lease(1 << 40)
        with pytest.raises(InvalidArgument):
            client.lease(MiB, near="tpu:0")
        with pytest.raises(NotFound):
            client.reclaim("nobody", MiB)
        with client.lease(MiB) as lease:
            with pytest.raises(InvalidArgument):
                lease.tensor(torch.float32, (MiB,))
            with pytest.raises(InvalidArgument):
                lease.tensor(torch.float32, (4,), offset=2)
            with pytest.raises(InvalidArgument):
                lease.tensor(torch.float32, (-1,))
            t = lease.tensor(torch.float16, (512, 1024))
            t.fill_(2)
            # Same memory, no copy: another view sees the write.
            assert lease.tensor(torch.int16, (4,)).tolist() == [0x4000] * 4
        assert lease.state == "released"
        assert issubclass(NoCapacity, HarvestError)


def test_help_and_version(no_node):
    result = no_node.cli("--help")
    assert result.returncode == 0
    for command in ("start", "stop", "status", "lenders", "leases", "revoke", "drain", "reclaim"):
        assert command in result.stdout
    assert no_node.cli("--version").returncode == 0
