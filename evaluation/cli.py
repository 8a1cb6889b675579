"""`onestep-sr eval` and `onestep-sr benchmark-quality`: the sub-commands, registered by `cli.py`.

Nothing here imports pyiqa at module level: `onestep-sr upscale` and the nodes never pay for it,
and without the `[eval]` extra the commands say how to install it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

EVAL_EXTRA_HINT = 'evaluation needs pyiqa: pip install "onestep-sr[eval]" (or pip install -e ".[eval]" in a clone)'


def _add_metric_options(parser: argparse.ArgumentParser) -> None:
    from .metrics import DEFAULT_METRICS, METRICS

    parser.add_argument("--metrics", nargs="+", default=None,
                        help=f"metrics (default: {' '.join(DEFAULT_METRICS)}); known: {', '.join(METRICS)}")
    parser.add_argument("--weights-dir", default=None,
                        help="metric weights in pyiqa's cache layout (pyiqa/, checkpoints/, clip/); "
                             "default: pyiqa's own cache (torch hub dir)")
    parser.add_argument("--allow-download", action="store_true",
                        help="let pyiqa download missing metric weights into --weights-dir")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto")
    form = parser.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help='print {"mean": ..., "per_image": [...], "problems": ...}')
    form.add_argument("--csv", action="store_true", help="print the per-image CSV (last row: the means)")
    form.add_argument("--markdown", action="store_true", help="print the mean row as a markdown table")
    parser.add_argument("--save", default=None, metavar="DIR",
                        help="also write per_image.csv, results.json and table.md into DIR")
    parser.add_argument("--ray", nargs="?", const="auto", default=None, metavar="ADDRESS",
                        help="score images on Ray metric workers (a local Ray, or the cluster at ADDRESS)")
    parser.add_argument("--workers", type=int, default=None, help="Ray metric workers (default: one per GPU or 2)")


def add_parsers(commands) -> None:
    ev = commands.add_parser("eval", help="score SR results against ground truth with the papers' metrics (pyiqa)")
    ev.add_argument("--pred", required=True, help="folder of super-resolved images")
    ev.add_argument("--gt", required=True, help="folder of ground-truth images (paired by file stem)")
    ev.add_argument("--label", default=None, help="row label in the tables (default: the --pred folder name)")
    _add_metric_options(ev)
    ev.set_defaults(handler=run_eval)

    bq = commands.add_parser("benchmark-quality",
                             help="upscale a test set with a method's published settings, score it, "
                                  "and print the row beside the paper's")
    bq.add_argument("--method", required=True, choices=["osediff", "s3diff", "hero_sr"])
    bq.add_argument("--dataset", required=True,
                    help="test-set folder with LR and HR sub-folders (test_LR/test_HR, LR/HR or lr/hr)")
    bq.add_argument("--set", dest="test_set", choices=["realsr", "drealsr", "div2k-val"], default=None,
                    help="which published row to compare with (default: guessed from the folder name)")
    bq.add_argument("--base", required=True, help="the method's base (as for upscale)")
    bq.add_argument("--weights", required=True, help="the method's weights file (as for upscale)")
    bq.add_argument("--output", default=None, help="where the SR images go (default: ./benchmark_quality/METHOD_SET)")
    bq.add_argument("--upscale-args", default="", help='extra upscale options, e.g. "--tokenizer DIR --dtype fp16"')
    _add_metric_options(bq)
    bq.set_defaults(handler=run_benchmark_quality)


class MissingExtra(ValueError):
    """An optional dependency is not installed; the message says which extra installs it."""


def _require_pyiqa() -> None:
    try:
        import pyiqa  # noqa: F401
    except ImportError as error:
        raise MissingExtra(f"{EVAL_EXTRA_HINT} ({error})") from None


def _device(name: str):
    from ..cli import _pick_device

    return _pick_device(name)


def _score(args: argparse.Namespace, pred: Path, gt: Path, specs):
    from .metric_weights import default_weights_dir
    from .runner import evaluate

    weights_dir = Path(args.weights_dir) if args.weights_dir else default_weights_dir()
    device = _device(args.device)
    score_pairs = None
    if args.ray is not None:
        from ..distributed.ray_eval import ray_pair_scorer

        score_pairs = ray_pair_scorer(args.ray, specs, weights_dir, device, args.allow_download, args.workers)
    return evaluate(pred, gt, specs, weights_dir, device, args.allow_download, score_pairs=score_pairs)


def _emit(args: argparse.Namespace, result, table_rows, label: str) -> None:
    from .report import json_text, markdown_table, per_image_csv, text_summary

    if args.save:
        folder = Path(args.save)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "per_image.csv").write_text(per_image_csv(result), encoding="utf-8")
        (folder / "results.json").write_text(json_text(result), encoding="utf-8")
        (folder / "table.md").write_text(markdown_table(result.metrics, table_rows) + "\n", encoding="utf-8")
    if args.json:
        print(json_text(result))
    elif args.csv:
        print(per_image_csv(result), end="")
    elif args.markdown:
        print(markdown_table(result.metrics, table_rows))
    else:
        print(text_summary(result, label) if len(table_rows) == 1 else markdown_table(result.metrics, table_rows))
    for line in result.problems.lines():
        print(f"onestep-sr eval: warning: {line}", file=sys.stderr)


def run_eval(args: argparse.Namespace) -> int:
    _require_pyiqa()
    from .metrics import parse_metric_names

    specs = parse_metric_names(args.metrics)
    pred, gt = Path(args.pred), Path(args.gt)
    result = _score(args, pred, gt, specs)
    label = args.label or pred.resolve().name
    _emit(args, result, [(label, result.mean)], label)
    return 0


def find_dataset_folders(dataset: Path) -> tuple[Path, Path]:
    """The LR and HR folders of a test set, or an error naming the names looked for."""
    for lr_name, hr_name in (("test_LR", "test_HR"), ("LR", "HR"), ("lr", "hr")):
        if (dataset / lr_name).is_dir() and (dataset / hr_name).is_dir():
            return dataset / lr_name, dataset / hr_name
    raise FileNotFoundError(f"no LR/HR sub-folders (test_LR + test_HR, LR + HR or lr + hr) in {dataset}")


def run_benchmark_quality(args: argparse.Namespace) -> int:
    _require_pyiqa()
    from .. import cli as main_cli
    from .metrics import parse_metric_names
    from .published import guess_test_set, published_row, test_sets

    specs = parse_metric_names(args.metrics)  # before the long upscale: a typo fails at once
    dataset = Path(args.dataset)
    lr_dir, hr_dir = find_dataset_folders(dataset)
    test_set = args.test_set or guess_test_set(dataset)
    if test_set is None:
        raise ValueError(f"cannot tell which test set {dataset.name} is; pass --set ({', '.join(test_sets())})")
    output = Path(args.output) if args.output else Path("benchmark_quality") / f"{args.method}_{test_set}"
    upscale_argv = ["upscale", str(lr_dir), "-o", str(output), "--base", args.base, "--weights", args.weights,
                    "--method", args.method, *shlex.split(args.upscale_args)]
    if "--device" not in upscale_argv:
        upscale_argv += ["--device", args.device]
    status = main_cli.main(upscale_argv)
    if status != 0:
        return status
    result = _score(args, output, hr_dir, specs)
    published = published_row(args.method, test_set)
    rows = [(f"{args.method} (this run, {test_set})", result.mean),
            (f"{args.method} (published, {test_set})", published.values)]
    _emit(args, result, rows, rows[0][0])
    if not args.json:
        print(f"published: {published.source}")
    return 0
