"""``python -m harvestd.cli``: the same CLI as ``harvestd``."""

from harvestd.cli import main

main()
