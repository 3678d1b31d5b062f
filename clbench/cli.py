"""``clbench`` command line: run, list, leaderboard, codec, pretrain, sweep, reproduce.

User errors (:class:`clbench.errors.ClbenchError`) print one line and exit with status 2;
nothing half-written is left behind because every output is written atomically.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys
from pathlib import Path

from clbench.errors import exit_status
from clbench.records import DEFAULT_RESULTS_DIR as DEFAULT_OUT

# sub-command providers: (module, function adding its parser); each lives beside what it runs
COMMAND_PROVIDERS = (
    ("clbench.leaderboard", "add_leaderboard_command"),
    ("clbench.codecs.cli", "add_codec_commands"),
    ("clbench.pretrain", "add_pretrain_command"),
    ("clbench.sweep", "add_sweep_command"),
    ("clbench.reproduce", "add_reproduce_command"),
)


def _cmd_run(args: argparse.Namespace) -> int:
    from clbench.config import load_config
    from clbench.provenance import pin_git_state

    pin_git_state()  # the provenance commit is the code loaded now, not at the end
    cfg = load_config(args.benchmark, args.set)  # config errors come before heavy imports
    from clbench.runner import run_benchmark

    out = Path(args.out)
    command = "clbench " + shlex.join(sys.argv[1:])
    run_benchmark(
        cfg,
        out,
        strategies=args.strategy,
        seeds=args.seed,
        data_root=args.data_root,
        device=args.device,
        resume=args.resume,
        force=args.force,
        command=command,
        progress=not args.no_progress,
        lock_timeout=args.lock_timeout,
    )
    if not args.no_leaderboard:
        from clbench.leaderboard import build_leaderboard

        res = build_leaderboard(out, lock_timeout=max(args.lock_timeout, 60.0))
        print(f"leaderboard: {', '.join(str(p) for p in res.paths[:3])} and {out / 'plots'}/")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from clbench.config import BENCHMARKS_DIR

    kinds = {
        "strategies": lambda: __import__(
            "clbench.strategies.base", fromlist=["STRATEGIES"]
        ).STRATEGIES.names(),
        "benchmarks": lambda: sorted(p.stem for p in BENCHMARKS_DIR.glob("*.yaml")),
        "datasets": lambda: __import__("clbench.datasets", fromlist=["DATASETS"]).DATASETS.names(),
        "backbones": lambda: __import__(
            "clbench.backbones", fromlist=["BACKBONES"]
        ).BACKBONES.names(),
        "codecs": lambda: __import__("clbench.codecs", fromlist=["CODECS"]).CODECS.names(),
    }
    for kind in [args.what] if args.what else kinds:
        print(f"{kind}: {', '.join(kinds[kind]())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clbench", description="Class-incremental learning benchmarks, strategies and codecs."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="run a benchmark (default: digits) and write the leaderboard")
    r.add_argument("benchmark", nargs="?", default="digits", help="benchmark name or YAML path")
    r.add_argument(
        "--strategy",
        action="extend",
        nargs="+",
        metavar="NAME",
        help="strategy names (default: the config's)",
    )
    r.add_argument(
        "--seed",
        action="extend",
        nargs="+",
        type=int,
        metavar="N",
        help="seeds (default: the config's)",
    )
    r.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.epochs=3",
    )
    r.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"results folder (default: {DEFAULT_OUT}/, git-ignored; committed evidence uses "
        "--out results)",
    )
    r.add_argument("--data-root", help="dataset root (default: $CLBENCH_DATA_ROOT, then ./data)")
    r.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    r.add_argument(
        "--resume", action="store_true", help="continue killed runs from their checkpoints"
    )
    r.add_argument(
        "--force",
        action="store_true",
        help="re-run even if a complete record exists (replacing it, also when its config differs)",
    )
    r.add_argument(
        "--lock-timeout",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="wait this long for a run that another process is writing (default 0: exit at once)",
    )
    r.add_argument("--no-leaderboard", action="store_true", help="do not rebuild the leaderboard")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.set_defaults(func=_cmd_run)
    ls = sub.add_parser(
        "list", help="list registered strategies, benchmarks, datasets, backbones, codecs"
    )
    ls.add_argument(
        "what", nargs="?", choices=["strategies", "benchmarks", "datasets", "backbones", "codecs"]
    )
    ls.set_defaults(func=_cmd_list)
    for module, fn in COMMAND_PROVIDERS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # a provider's own import failed: a real bug
                raise
            continue
        getattr(mod, fn)(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv or ["run"])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return exit_status(args.func, args)
    except KeyboardInterrupt:
        print("clbench: interrupted; re-run with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
