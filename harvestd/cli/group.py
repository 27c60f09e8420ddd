"""The ``harvestd`` command group and what every command shares: one-line errors with
exit code 2, the option types, and the ``--state-dir`` / ``--json`` options."""

from __future__ import annotations

import math
import sys
import unicodedata
from typing import NoReturn

import click

from harvestd.errors import HarvestError, InvalidArgument
from harvestd.sizes import parse_size

EXIT_USAGE = 2

# Characters that end a line (for str.splitlines, a terminal or a log reader) or that
# cannot be written out at all: control characters, line and paragraph separators, and
# the lone surrogates that stand for bytes of an argument that is not UTF-8.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


def one_line(text: str) -> str:
    """``text`` as one printable line: each line break, control character and lone
    surrogate written as Python's ``repr`` writes it (``\\n``, ``\\x85``, ``\\u2028``,
    ``\\udcff``), so that no argument can split an error or forge a log line."""
    return "".join(
        repr(c)[1:-1] if unicodedata.category(c) in _ESCAPED_CATEGORIES else c for c in text
    )


def _fail(message: str) -> NoReturn:
    click.echo(f"harvestd: error: {one_line(message)}", err=True)
    sys.exit(EXIT_USAGE)


class _Cli(click.Group):
    """A group that turns every expected failure into one line and exit code 2."""

    def main(self, *args, **kwargs):  # noqa: D401 - click's signature
        kwargs["standalone_mode"] = False
        try:
            result = super().main(*args, **kwargs)
        except click.exceptions.Abort:
            click.echo("harvestd: aborted", err=True)
            sys.exit(1)
        except click.exceptions.NoArgsIsHelpError:
            # click's message here is the whole help text.
            _fail("missing command (see `harvestd --help`)")
        except click.exceptions.UsageError as err:
            hint = f" (see `{err.ctx.command_path} --help`)" if err.ctx else ""
            _fail(f"{err.format_message()}{hint}")
        except click.exceptions.ClickException as err:
            _fail(err.format_message())
        except HarvestError as err:
            # Some errors list several problems, one per line (a settings file's).
            _fail("; ".join(str(err).splitlines()) or type(err).__name__)
        except UnicodeError as err:
            # Decoding and encoding errors have a reason; a plain UnicodeError (the idna
            # codec's, for a bad host name) has only its message.
            reason = (
                err.reason
                if isinstance(err, (UnicodeDecodeError, UnicodeEncodeError, UnicodeTranslateError))
                else str(err)
            )
            _fail(f"an argument is not valid text ({reason})")
        except KeyboardInterrupt:
            sys.exit(130)
        sys.exit(result if isinstance(result, int) else 0)


class Seconds(click.ParamType):
    """A finite number of seconds, at least 0 (above it with ``positive``), at most
    ``most``: NaN or infinity would make a wait loop spin or a gRPC deadline
    meaningless, so they are refused here with the option's name."""

    name = "seconds"

    def __init__(self, most: float | None = None, positive: bool = False) -> None:
        self.most = most
        self.positive = positive

    def convert(self, value, param, ctx) -> float:
        """The number of seconds in ``value``, or a usage error that names the option."""
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a finite number of seconds", param, ctx)
        if seconds < 0 or (self.positive and seconds == 0):
            self.fail(
                f"{value!r} must be {'positive' if self.positive else 'at least 0'}", param, ctx
            )
        if self.most is not None and seconds > self.most:
            self.fail(f"{value!r} is more than {self.most:g} seconds", param, ctx)
        return seconds


def size_argument(ctx, param, value):
    """A click callback: ``value`` (``512MiB``, ``4096``) in bytes, or a usage error."""
    if value is None:
        return None
    try:
        size = parse_size(value)
    except InvalidArgument as err:
        raise click.BadParameter(str(err)) from None
    return size


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="The node's state directory (default: $HARVEST_STATE_DIR, else "
    "$XDG_RUNTIME_DIR/harvest, else ~/.cache/harvest).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="harvest", prog_name="harvestd")
def cli() -> None:
    """Harvest: lend idle GPU memory to other jobs as a revocable cache tier."""
