"""Fixtures that run real Harvest nodes: real processes, real Ray, real sockets.

Only pytest fixtures live here; what tests import (nodes, holders, clocks, waiting)
is in the ``support`` package next to this file.
"""

from __future__ import annotations

import shutil
from typing import Iterator

import pytest
from support.nodes import ManyLenderNode, Node, PlainNode, running_plain_node, started_node
from support.sockets import short_tmpdir


@pytest.fixture
def plain_node() -> Iterator[PlainNode]:
    """A fresh plain-process node per test: TTL 2 s, grace 1 s, 64 MiB of host memory."""
    with running_plain_node() as node:
        yield node


@pytest.fixture(scope="module")
def many_lender_node() -> Iterator[ManyLenderNode]:
    """A broker and three host lenders (32 MiB each) as plain processes, per module."""
    node = ManyLenderNode(short_tmpdir())
    node.start_broker()
    node.start_lenders()
    yield node
    node.stop()
    shutil.rmtree(node.state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_node() -> Iterator[Node]:
    """One real node for the session, started by the CLI: Ray, the broker actor and a
    host lender actor (256 MiB, TTL 3 s, grace 1 s)."""
    with started_node(
        "--backend", "host", "--host-bytes", "256MiB", "--ttl", "3", "--grace", "1", timeout=240
    ) as node:
        yield node
