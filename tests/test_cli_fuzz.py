"""The ``harvestd`` CLI with random arguments against a running node: exit 0 or 2, one
clear line, never a traceback.

Each bug this found is fixed, and pinned by a test of its own below (named in
docs/reliability.md); the random strategies draw those inputs too, so the fuzz guards
them as well.
"""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.env import PY, node_env
from support.nodes import PlainNode, running_plain_node

from harvestd.invariants import check_store

# What str.splitlines() breaks on (test_cli_argument_with_a_line_break), drawn often.
LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
# Any character an argument can hold: not NUL, and of the lone surrogates only those that
# stand for a byte that is not UTF-8 (U+DC80..U+DCFF, as os.fsencode writes them; see
# test_cli_undecodable_argument).
CLI_TEXT = st.text(
    st.one_of(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        st.sampled_from(LINE_BREAKS),
        st.characters(min_codepoint=0xDC80, max_codepoint=0xDCFF),
    ),
    max_size=12,
)
SIZES = st.one_of(
    st.sampled_from(
        [
            "-5",
            "1e99",
            "",
            "0",
            "1",
            "4096",
            "64MiB",
            "1.5GiB",
            "9999TiB",
            "99999999TiB",
            "9" * 40,
            "lots",
            "١٢٣",
            " 7 kib ",
            "NaN",
            "-0",
        ]
    ),
    CLI_TEXT,
)
FLOATS = st.one_of(
    st.sampled_from(["-1", "0", "0.1", "nan", "inf", "-inf", "1e300", "x", ""]), CLI_TEXT
)


@st.composite
def cli_args(draw: st.DrawFn, lender_id: str) -> list[str]:
    """An argument list for one subcommand (and a few junk ones)."""
    lender = draw(st.one_of(st.just(lender_id), CLI_TEXT))
    size = draw(SIZES)
    junk = draw(st.lists(CLI_TEXT, max_size=2))
    command = draw(
        st.sampled_from(
            [
                "status",
                "lenders",
                "leases",
                "revoke",
                "drain",
                "reclaim",
                "restore",
                "config",
                "junk",
            ]
        )
    )
    flags = draw(
        st.lists(st.sampled_from(["--json", "--all", "--force", "--help"]), max_size=2, unique=True)
    )
    if command in ("status", "lenders"):
        args = [command, *flags, *junk]
    elif command == "leases":
        args = [command, *flags, "--lender", lender, *junk]
    elif command == "revoke":
        args = [
            command,
            draw(st.one_of(st.just("lease-0"), CLI_TEXT)),
            *flags,
            "--reason",
            draw(CLI_TEXT),
        ]
    elif command == "drain":
        args = [command, lender, "--timeout", draw(FLOATS)]
    elif command == "reclaim":
        args = [command, "--lender", lender, "--bytes", size, "--timeout", draw(FLOATS)]
    elif command == "restore":
        args = [command, "--lender", lender, "--bytes", size]
    elif command == "config":
        option = draw(
            st.sampled_from(
                [
                    "--host-bytes",
                    "--reserve",
                    "--cap",
                    "--ttl",
                    "--grace",
                    "--backend",
                    "--gpus",
                    "--listen",
                    "--metrics-port",
                    "--config",
                ]
            )
        )
        args = [command, option, draw(st.one_of(SIZES, FLOATS)), *flags[:1]]
    else:
        args = junk  # none at all, too: test_cli_without_arguments
    # An option missing its value, or junk where a value belongs.
    if args and draw(st.integers(0, 9)) == 0:
        args = args[:-1]
    return args


@pytest.fixture(scope="module")
def cli_node():
    """A plain node of its own for the CLI fuzz."""
    with running_plain_node() as node:
        yield node


def _one_clear_outcome(result: subprocess.CompletedProcess, args: list[str]) -> None:
    assert result.returncode in (0, 2), (args, result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, (args, result.stderr[-2000:])
    if result.returncode == 2:
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("harvestd: error: "), (args, result.stderr)


def test_cli_fuzz(cli_node: PlainNode) -> None:
    """Random arguments to every command that talks to (or reads for) a running node:
    exit 0 or 2, no traceback, and on 2 one line. ``start``, ``stop`` and ``top`` are
    left out: the first would start a Ray node, the second would stop this one, the
    third takes over a terminal; ``config`` parses every option ``start`` takes."""

    @settings(
        max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
    )
    @given(args=cli_args(cli_node.id))
    def run(args: list[str]) -> None:
        _one_clear_outcome(cli_node.cli(*args, timeout=60), args)

    run()
    # Whatever the fuzz drained or reclaimed, the node still lends.
    cli_node.cli("restore", "--lender", cli_node.id, check=True)
    assert check_store(str(cli_node.state_dir / "broker.db")) == []


@pytest.mark.parametrize("command", ["reclaim", "restore"])
@pytest.mark.parametrize("size", ["99999999TiB", "9" * 400])
def test_cli_sizes_past_uint64(cli_node: PlainNode, command: str, size: str) -> None:
    """A ``--bytes`` past what the wire carries (``99999999TiB`` is 1.1e20; 400 nines
    are past what a float holds) is refused while parsing, with one line naming the
    option and exit 2, before any request is built."""
    result = cli_node.cli(command, "--lender", cli_node.id, "--bytes", size)
    _one_clear_outcome(result, [command, size])
    assert result.returncode == 2 and "--bytes" in result.stderr and "too large" in result.stderr, (
        result.stderr
    )


def test_cli_undecodable_argument(cli_node: PlainNode) -> None:
    """``harvestd revoke $'\\xff'``: Python decodes the byte to the surrogate
    ``\\udcff``, which no request can carry (protobuf strings are UTF-8). The CLI says
    in one line that an argument is not valid text, exit 2; and where it quotes such an
    argument it writes the surrogate escaped."""
    said = {"revoke": "an argument is not valid text", "status": "a\\udcffb"}
    for args in (["revoke", os.fsdecode(b"\xff")], ["status", os.fsdecode(b"a\xffb")]):
        cmd = [PY, "-m", "harvestd", *args, "--state-dir", str(cli_node.state_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=node_env())
        _one_clear_outcome(result, [ascii(a) for a in args])
        assert result.returncode == 2 and said[args[0]] in result.stderr, result.stderr


def test_cli_without_arguments() -> None:
    """``harvestd`` alone is a usage error like any other: one line that points at
    ``harvestd --help``, exit 2 (click's own message here is the whole help text)."""
    result = subprocess.run(
        [PY, "-m", "harvestd"], capture_output=True, text=True, timeout=60, env=node_env()
    )
    _one_clear_outcome(result, [])
    assert result.returncode == 2 and "--help" in result.stderr


@pytest.mark.parametrize("arg", ["\n", "a\rb", "x\u2028y", "\x85", "\x1b[31mred", "tab\there"])
def test_cli_argument_with_a_line_break(cli_node: PlainNode, arg: str) -> None:
    """Found by test_cli_fuzz: click quotes a stray argument as it is (``harvestd status
    $'\\r'``: "Got unexpected extra argument (...)"). The CLI escapes every control
    character, line or paragraph separator in an error as ``repr`` does, so the error
    stays one line that scripts can parse and no argument can forge a log line."""
    result = cli_node.cli("status", arg)
    _one_clear_outcome(result, ["status", arg])
    assert result.returncode == 2
    assert repr(arg)[1:-1] in result.stderr, result.stderr


@pytest.mark.parametrize(
    "args", [["drain", "LENDER"], ["reclaim", "--lender", "LENDER", "--bytes", "1MiB"], ["stop"]]
)
@pytest.mark.parametrize("timeout", ["nan", "inf", "-inf", "1e400", "-1"])
def test_cli_refuses_timeouts_that_are_not_finite(
    cli_node: PlainNode, args: list[str], timeout: str
) -> None:
    """``--timeout nan`` or ``inf`` is refused while parsing, with one line that names
    the option, exit 2, before anything reaches the node (a NaN or infinite gRPC
    deadline would expire before the request left, and read as "no node answers")."""
    args = [cli_node.id if a == "LENDER" else a for a in args]
    result = cli_node.cli(*args, "--timeout", timeout)
    _one_clear_outcome(result, args)
    assert result.returncode == 2 and "'--timeout'" in result.stderr, result.stderr
    assert cli_node.broker is not None
    assert cli_node.broker.poll() is None, "the node stopped"
