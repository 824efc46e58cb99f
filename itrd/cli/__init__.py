"""The `itrd` command line: local training and evaluation, and (with the service installed) jobs."""

from itrd.cli.main import cli, main

__all__ = ["cli", "main"]
