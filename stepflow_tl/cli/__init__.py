"""The ``stepflow-tl`` command line. It imports the library; the library never imports it."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
