"""``python -m harvestd`` is the ``harvestd`` CLI."""

from harvestd.cli import main

main()
