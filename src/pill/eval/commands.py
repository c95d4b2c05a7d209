"""Sub-commands ``pill score scienceqa``, ``pill score mme``, ``pill plot training`` and ``pill plot gates``.

Each handler maps its flags onto one library function; heavy imports (matplotlib)
happen inside the handlers so that ``pill --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _score_scienceqa(args: argparse.Namespace) -> int:
    from pill.data.scienceqa import load_split
    from pill.eval.scienceqa_score import format_table, score_file

    scores = score_file(
        args.predictions, args.data, args.split, official_fallback=args.official_fallback, seed=args.seed
    )
    split_size = len(load_split(args.data, args.split))
    if scores["count"] < split_size:
        print(
            f"note: {split_size - scores['count']} of {split_size} problems in split {args.split!r} "
            f"have no prediction and were not scored",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps(scores, indent=2))
    else:
        print(format_table(scores))
    return 0


def _score_mme(args: argparse.Namespace) -> int:
    from pill.eval.mme_score import format_scores, score_results

    scores = score_results(args.results)
    if scores["missing"]:
        print(f"note: no results for {', '.join(scores['missing'])}; the totals leave them out", file=sys.stderr)
    print(json.dumps(scores, indent=2) if args.json else format_scores(scores))
    return 0


def _plot_training(args: argparse.Namespace) -> int:
    from pill.eval.plots import plot_training, read_metrics

    run = Path(args.run)
    out = plot_training(read_metrics(run / "metrics.jsonl"), args.out, title=f"Training: {run.name}")
    print(f"wrote {out}")
    return 0


def _plot_gates(args: argparse.Namespace) -> int:
    from pill.eval.plots import plot_gates, read_gates

    run = Path(args.run)
    layers, values, variant = read_gates(run / "gates.json")
    title = f"Mean |tanh(gate)| per layer: {run.name}" + (f" ({variant} gate)" if variant else "")
    out = plot_gates(values, args.out, title=title, layers=layers)
    print(f"wrote {out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``score`` and ``plot`` with their sub-commands to the ``pill`` parser."""
    score = subparsers.add_parser("score", help="score predictions without running a model")
    score_sub = score.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    sqa = score_sub.add_parser(
        "scienceqa",
        help="ScienceQA accuracy (NAT SOC LAN TXT IMG NO G1-6 G7-12 Avg, per topic) of a predictions file",
    )
    sqa.add_argument("--predictions", required=True, metavar="FILE",
                     help='{"results": {qid: option_index}} (official format) or {qid: option_index}')
    sqa.add_argument("--data", required=True, metavar="ROOT", help="ScienceQA folder: problems.json + pid_splits.json, or the parquet export")
    sqa.add_argument("--split", default="test", help="split of pid_splits.json (default: test)")
    sqa.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    sqa.add_argument("--official-fallback", action="store_true",
                     help="replace unparsed answers by a random option (fixed seed), as the reference scripts do")
    sqa.add_argument("--seed", type=int, default=0, help="seed of the --official-fallback draws (default: 0)")
    sqa.set_defaults(func=_score_scienceqa)
    mme = score_sub.add_parser(
        "mme", help="MME scores (per subtask acc, acc+, their sum; perception and cognition totals) of a results folder")
    mme.add_argument("--results", required=True, metavar="DIR",
                     help="one tab-separated <subtask>.txt per subtask: image, question, ground truth, answer")
    mme.add_argument("--json", action="store_true", help="print JSON instead of a markdown table")
    mme.set_defaults(func=_score_mme)

    plot = subparsers.add_parser("plot", help="figures from a run directory")
    plot_sub = plot.add_subparsers(dest="figure", metavar="FIGURE", required=True)
    training = plot_sub.add_parser("training", help="loss and learning rate vs step from RUN/metrics.jsonl")
    training.add_argument("--run", required=True, metavar="DIR")
    training.add_argument("--out", required=True, metavar="PNG")
    training.set_defaults(func=_plot_training)
    gates = plot_sub.add_parser("gates", help="mean |tanh(gate)| per layer from RUN/gates.json (paper Fig. 4)")
    gates.add_argument("--run", required=True, metavar="DIR")
    gates.add_argument("--out", required=True, metavar="PNG")
    gates.set_defaults(func=_plot_gates)
