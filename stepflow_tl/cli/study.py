"""``stepflow-tl eval``, ``ablate`` and ``demo``: paired studies from the command line."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from ..errors import StepflowError
from ..study import (
    ABLATION,
    CONDITIONS,
    DEFAULT_CONDITIONS,
    Problem,
    StudyResult,
    builtin_suite,
    evaluate,
    load_problems,
)
from ..study.conditions import resolve_conditions
from ..study.problems import BENCHMARK_BUDGETS
from ..study.demo import honesty_note, run_demo
from ..traces.formats import FORMAT_CHOICES, SPLIT_CHOICES
from .common import (
    SAMPLING_DEFAULTS,
    add_engine_arg,
    add_model_args,
    check_engine_args,
    check_flags,
    check_sampling_flags,
    launch_state,
    load_from_args,
    prepare_out,
    refuse_unused,
)



def _budget(text: str):
    """``--max-new-tokens``: an integer, or ``benchmark`` (each problem's own budget)."""
    if text == "benchmark":
        return text
    try:
        return int(text)
    except ValueError:
        raise StepflowError(f"--max-new-tokens must be an integer or 'benchmark', got {text!r}") from None

def _add_study_arguments(parser, default_conditions: Sequence[str]) -> None:
    parser.add_argument("problems", nargs="?", default="builtin",
                        help="problem file (.jsonl/.json/.csv/.parquet, see docs/problems.md) or 'builtin' "
                        "(the built-in suite, see --levels/--n-per-level)")
    add_model_args(parser)
    add_engine_arg(parser)
    parser.add_argument("--conditions", default=",".join(default_conditions),
                        help=f"comma-separated names from: {', '.join(CONDITIONS)}")
    parser.add_argument("--levels", default=None, help="built-in suite levels, comma-separated (default 1,2,3)")
    parser.add_argument("--n-per-level", type=int, default=None, help="built-in suite problems per level (default 10)")
    parser.add_argument("--suite-seed", type=int, default=None, help="built-in suite seed (default 0)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N problems")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-new-tokens", type=_budget, default=256,
                        help="token budget, or 'benchmark': each problem's benchmark budget (AIME 30000, "
                             "GPQA 12000; with --benchmark)")
    parser.add_argument("--benchmark", choices=("auto", *BENCHMARK_BUDGETS), default=None,
                        help="tag the problems with their benchmark's budget (auto: GPQA rows, files named *aime*)")
    parser.add_argument("--do-sample", action="store_true", help="nucleus sampling instead of greedy")
    parser.add_argument("--temperature", type=float, default=None, help="with --do-sample (default 0.6)")
    parser.add_argument("--top-p", type=float, default=None, help="with --do-sample (default 0.95)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--prompt-style", choices=("chat", "r1"), default="chat")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="auto")
    parser.add_argument("--split", choices=SPLIT_CHOICES, default="auto",
                        help="how generated traces are cut into steps (auto: lines for the plain format, "
                        "else blank_lines; sentences_min15: sentences, a short one joined to the next)")
    parser.add_argument("--split-summary", action="store_true",
                        help="also split the summary into steps (the authors' convention; default: the summary is one step)")
    parser.add_argument("--saliency", type=int, default=0,
                        help="Step-Saliency maps of up to N correct and N incorrect traces per condition "
                        "(-1: every trace; 0: none)")
    parser.add_argument("--results", default=None, help="results JSONL (default: OUT/results.jsonl); resumed if it exists")
    parser.add_argument("--out", required=True, help="directory for report.html and the CSV files")
    parser.add_argument("--no-progress", action="store_true")


def problems_from_args(args) -> List[Problem]:
    """The problems named on the command line."""
    if args.limit is not None and args.limit < 1:
        raise StepflowError(f"--limit must be >= 1, got {args.limit}")
    if args.problems == "builtin":
        refuse_unused(args, {"benchmark": "--benchmark"}, "with the built-in problems",
                      "drop --benchmark, or pass a problem file")
        text = "1,2,3" if args.levels is None else args.levels
        try:
            levels = tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise StepflowError(f"--levels must be comma-separated integers, got {text!r}") from None
        problems = builtin_suite(n_per_level=10 if args.n_per_level is None else args.n_per_level, levels=levels,
                                 seed=0 if args.suite_seed is None else args.suite_seed)
    else:
        refuse_unused(args, {"levels": "--levels", "n_per_level": "--n-per-level", "suite_seed": "--suite-seed"},
                      f"with a problem file ({args.problems}); they choose built-in problems",
                      "drop the flag, or pass 'builtin' instead of the file")
        problems = load_problems(args.problems, benchmark=args.benchmark)
        if not problems:
            raise StepflowError(f"{args.problems} holds no problems; expected records with a question and an "
                                "answer (see docs/problems.md)")
    return problems[: args.limit] if args.limit else problems


def run_study_cli(args, *, title: Optional[str] = None, notes: str = "") -> StudyResult:
    """Load the model (per process under accelerate), run the study, and on the main
    process write report.html and the CSV files into ``args.out``."""
    if not args.do_sample:
        refuse_unused(args, {"temperature": "--temperature", "top_p": "--top-p"},
                      "without --do-sample (greedy decoding draws nothing)", "add --do-sample or drop the flag")
        if args.samples > 1:
            # Greedy copies of one output would count as independent items in the intervals.
            raise StepflowError(f"--samples {args.samples} without --do-sample repeats the same greedy output "
                                f"{args.samples} times and would shrink every interval; add --do-sample or drop it")
    check_flags(args, ints=[("samples", 1, None), ("max_new_tokens", 1, None), ("batch_size", 1, None),
                            ("saliency", -1, None), ("n_per_level", 1, None)])
    check_sampling_flags(args)
    check_engine_args(args)
    if args.engine == "vllm" and args.saliency:
        raise StepflowError("--saliency needs a TransformerLens model; with --engine vllm run without it and map "
                            "the saved traces with the TL engine")
    state = launch_state(args)
    out = prepare_out(args.out)
    results = Path(args.results) if args.results else out / "results.jsonl"
    problems = problems_from_args(args)
    resolve_conditions(args.conditions)  # a misspelt condition is refused before the model loads
    model = load_from_args(args)
    result = evaluate(
        model, problems, conditions=args.conditions, samples=args.samples, seed=args.seed,
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
        temperature=SAMPLING_DEFAULTS["temperature"] if args.temperature is None else args.temperature,
        top_p=SAMPLING_DEFAULTS["top_p"] if args.top_p is None else args.top_p,
        batch_size=args.batch_size, results_path=results, progress=not args.no_progress,
        saliency=True if args.saliency < 0 else args.saliency, prompt_style=args.prompt_style, format=args.format,
        split=args.split, split_summary=args.split_summary,
    )
    if not state or state.is_main_process:
        paths = result.to_csv(out)
        report = result.save_html(out / "report.html", title=title, notes=notes)
        print(f"report: {report}")
        print(f"csv: {', '.join(str(p) for p in paths.values())}")
        print(f"results: {results}")
        print(result.headline())
    return result


def run_study_command(args) -> int:
    """``stepflow-tl eval`` and ``stepflow-tl ablate`` (they differ in default conditions only)."""
    run_study_cli(args)
    return 0


def add_demo_arguments(parser) -> None:
    """Arguments of ``stepflow-tl demo``."""
    parser.add_argument("--out", default="stepflow_demo", help="directory for the report, CSVs and results.jsonl")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny run (2 problems, 2 conditions, 16 tokens, no maps) for smoke tests")
    parser.add_argument("--model", default=None,
                        help="default: the embedded SmolLM2-135M-Instruct ('tiny': a random 2-layer model)")
    parser.add_argument("--no-progress", action="store_true")


def run_demo_cli(args) -> int:
    """``stepflow-tl demo``: run, then print where the report is and the headline numbers."""
    prepare_out(args.out)
    result, report, seconds = run_demo(args.out, quick=args.quick, model_name=args.model,
                                       progress=not args.no_progress)
    n = result.config["n_problems"]
    print(f"\nreport: {report}")
    print(f"csv and results: {Path(args.out)}/ (items.csv, summary.csv, by_difficulty.csv, results.jsonl)")
    print(f"model: {result.config['model']}, {n} built-in problems, greedy, "
          f"max {result.config['max_new_tokens']} new tokens; wall time {seconds:.0f} s")
    print(f"steps: {result.config['trace_format']} format, '{result.config['split']}' split "
          f"(format and split 'auto')")
    print(result.headline())
    print("\n" + honesty_note(result.config["model"], n))
    return 0


def add_commands(sub) -> None:
    ev = sub.add_parser("eval", help="a paired study: accuracy of a few conditions on a problem set")
    _add_study_arguments(ev, DEFAULT_CONDITIONS)  # baseline, StepFlow, its random control
    ev.set_defaults(func=run_study_command)
    ab = sub.add_parser("ablate", help="the full ablation grid: StepFlow, its parts, controls, placement swaps")
    _add_study_arguments(ab, ABLATION)  # the full grid
    ab.set_defaults(func=run_study_command)
    dm = sub.add_parser("demo", help="a small study on the embedded model, with an HTML report")
    add_demo_arguments(dm)
    dm.set_defaults(func=run_demo_cli)
