"""The ``stepflow-tl`` command line (also ``python -m stepflow_tl``): one parser, one
module per command group."""

from __future__ import annotations

import argparse
import sys

from . import analysis, generation, resampling, study, validation
from .common import run_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stepflow-tl",
        description="Step-Saliency and StepFlow for reasoning models on TransformerLens.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    analysis.add_commands(sub)
    generation.add_commands(sub)
    study.add_commands(sub)
    validation.add_commands(sub)
    resampling.add_commands(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "model_name", None) is not None:
        if args.model is not None and args.model != args.model_name:
            parser.error(f"info got two models, {args.model_name!r} and --model {args.model!r}; give one")
        args.model = args.model_name
    return run_command(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
