"""Subcommands contributed by the search methods (optimize, export)."""
from __future__ import annotations

import argparse


def register_commands(sub: argparse._SubParsersAction) -> None:
    """Add the method commands to the CLI parser (none yet beyond inspect/verify)."""
    return None
