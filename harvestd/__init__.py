"""harvestd: the Harvest broker, the node daemon that runs it beside the lenders, and
the ``harvestd`` CLI."""

__version__ = "0.1.0"
