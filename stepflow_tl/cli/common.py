"""What every command shares: the model arguments, loading the model from them, layer
specs, and turning a `StepflowError` into one line on stderr."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from ..errors import StepflowError
from ..tl.models import BACKENDS, DTYPES, load_model


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct; "
        "'tiny' is a random 2-layer model for smoke tests)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="bridge")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def load_from_args(args):
    """The model that ``--model/--backend/--device/--dtype`` name."""
    return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)


def parse_layers(text: str):
    """A layer spec from the command line: a band name, ``"3"``, ``"0,2,5"`` or ``"0-6"``."""
    if text in ("bottom_quarter", "top_quarter", "all"):
        return text
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a band (bottom_quarter, top_quarter, all), N, N,M or N-M; got {text!r}"
            ) from None
    return layers


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run one command; bad input is one line on stderr and exit status 2."""
    try:
        return func(args)
    except StepflowError as exc:
        print(f"stepflow-tl: error: {exc}", file=sys.stderr)
        return 2
