"""``export-volumes``: not implemented yet (tracked in its own issue); says so clearly."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Rebuild reviewed slice masks into NIfTI volumes (not implemented yet)."""
    click.echo("export-volumes is not implemented yet: see the exporter issue.", err=True)
    sys.exit(3)
