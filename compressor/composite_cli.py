"""``edge-compress composite``: measure members, their ensemble and their cascade, and write
the bundle's ``composite`` declaration with the threshold chosen on the evaluation set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bundle.composite import CompositeDecl, composite_to_obj

from .composite import CompositeReport, composite_report
from .dataset import DatasetError, load_dataset
from .runner import open_runner, read_signature

__all__ = ["add_composite"]


def add_composite(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register the ``composite`` subcommand."""
    p = subparsers.add_parser(
        "composite", help="measure an ensemble and a cascade of models, choose the threshold",
        description="Run MEMBER models (cheap first, expensive last; same inputs and "
        "outputs) over DATA's evaluation split; report each member's, the mean ensemble's "
        "and the cascade's accuracy and per-request latency, the cascade's threshold chosen "
        "as the fewest requests to the expensive model at an accuracy at least the target "
        "(default: the expensive model's). --declare writes the bundle manifest's "
        "'composite' declaration (docs/bundle-format.md).")
    p.add_argument("members", type=Path, nargs="+", metavar="MEMBER")
    p.add_argument("--data", type=Path, required=True, metavar="DATA.npz",
                   help="eval_x and eval_y (class indices) as for 'edge-compress evaluate'")
    p.add_argument("--output", required=True, help="the output holding class scores")
    p.add_argument("--scores", choices=["logits", "probabilities"], default="logits")
    p.add_argument("--target-accuracy", type=float, metavar="PERCENT",
                   help="the cascade's accuracy target (default: the expensive model's)")
    p.add_argument("--timed-rows", type=int, default=200, metavar="N",
                   help="evaluation rows timed one request at a time (default 200)")
    p.add_argument("--declare", choices=["cascade", "ensemble"],
                   help="print the manifest declaration of this kind instead of the report")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_composite)


def _composite(args: argparse.Namespace) -> int:
    if len(args.members) < 2:
        raise DatasetError("a composite needs at least two MEMBER models")
    data = load_dataset(args.data, "eval")
    if data is None:
        raise DatasetError(f"{args.data}: no evaluation inputs (eval_x/<input>, eval_x or x).")
    labels = data.labels.get(args.output, data.labels.get(""))
    if labels is None:
        raise DatasetError(f"{args.data}: no labels for output {args.output!r} (eval_y or "
                           f"eval_y/{args.output})")
    first_input = read_signature(args.members[0]).inputs[0].name
    inputs = {name or first_input: value for name, value in data.inputs.items()}
    members = {path.name: open_runner(path) for path in args.members}
    report = composite_report(members, inputs, labels, args.output, scores=args.scores,
                              timed_rows=args.timed_rows, target_accuracy=args.target_accuracy)
    if args.declare:
        print(json.dumps(composite_to_obj(_declaration(args, report)), indent=2))
    elif args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_table(report))
    return 0


def _declaration(args: argparse.Namespace, report: CompositeReport) -> CompositeDecl:
    paths = tuple(f"artifacts/{p.name}" for p in args.members)
    if args.declare == "cascade":
        return CompositeDecl("cascade", (paths[0], paths[-1]), args.output, args.scores,
                             threshold=report.threshold)
    return CompositeDecl("ensemble", paths, args.output, args.scores, combiner="mean")


def _table(report: CompositeReport) -> str:
    rows = list(report.members.items())
    rows += [("ensemble (mean)", report.ensemble), ("cascade", report.cascade)]
    lines = [f"{'':24} {'accuracy':>9} {'mean ms':>9} {'p50 ms':>9} {'p99 ms':>9}"]
    lines += [f"{name:24} {f.accuracy:8.2f}% {f.mean_ms:9.3f} {f.p50_ms:9.3f} {f.p99_ms:9.3f}"
              for name, f in rows]
    lines.append(f"cascade threshold {report.threshold:.4f}: {report.expensive_share:.1%} of "
                 f"requests to the expensive model (target {report.target_accuracy:.2f}%)")
    return "\n".join(lines)
