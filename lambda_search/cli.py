"""The ``lambda-search`` command. It holds no logic: each command parses, calls the library, prints."""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import warnings

from . import (MODEL_NAMES, STORAGE_ENV, ConfigError, StorageError, StudyError, __version__, build_model,
               default_plot_path, export_csv, format_bench, format_selection, load_config, open_store,
               paper_figure4_config, plot_figure4, redact, resume_config, run_bench, run_search, run_worker, select,
               status_table, stop_on_signals, study_status)

USER_ERRORS = (ConfigError, StorageError, StudyError)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _models(args: argparse.Namespace) -> int:
    print(f"{'name':<10} {'shortcut':>8} {'classes':>8} {'parameters':>12}")
    for name in MODEL_NAMES:
        shortcuts = ("B",) if name == "resnet18" else ("B", "A")
        for shortcut in shortcuts:
            model = build_model(name, args.num_classes, shortcut=shortcut)
            count = sum(p.numel() for p in model.parameters())
            print(f"{name:<10} {shortcut:>8} {args.num_classes:>8} {count:>12,}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _workers(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer >= 1, got {text!r}") from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def _say(text: str) -> None:
    print(text, flush=True)


def _progress():
    """Per-epoch progress, on a terminal only: one line, rewritten."""
    if not sys.stderr.isatty():
        return None

    def show(text: str) -> None:
        sys.stderr.write("\r" + text[:150].ljust(150) + "\r")
        sys.stderr.flush()
    return show


def _interrupted(stop) -> int:
    print("interrupted: finished folds and checkpoints are kept; run the same command again to resume",
          file=sys.stderr)
    return 128 + int(stop.signal)


def _write_plot(status, path, prefer="larger"):
    try:
        return plot_figure4(status, path, prefer)
    except OSError as exc:
        raise StorageError(f"cannot write the plot {str(path)!r}: {exc.strerror or exc}") from None


def _finish(status, stop) -> int:
    print(status_table(status))
    if stop():
        return _interrupted(stop)
    if not status.finished:
        print(f"{status.total - status.complete} points are not complete; resume with: lambda-search resume "
              f"--storage {status.storage} --study {status.name}", file=sys.stderr)
        return 1
    print()
    print(format_selection(select(status)))
    print(f"\nFigure 4: {_write_plot(status, default_plot_path(status))}")
    return 0


def _search(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.storage is not None:
        overrides.append(f"study.storage={json.dumps(args.storage)}")
    if args.study is not None:
        overrides.append(f"study.name={json.dumps(args.study)}")
    config = load_config(args.config, overrides)
    with stop_on_signals() as stop:
        _, status = run_search(config, workers=args.workers, log=_say, progress=_progress(), should_stop=stop)
    return _finish(status, stop)


def _resume(args: argparse.Namespace) -> int:
    config = resume_config(args.storage, args.study, args.set)
    with stop_on_signals() as stop:
        _, status = run_search(config, workers=args.workers, log=_say, progress=_progress(), should_stop=stop,
                               resume_only=True)
    return _finish(status, stop)


def _worker(args: argparse.Namespace) -> int:
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise StorageError(f"worker needs --storage URL (or the {STORAGE_ENV} environment variable)")
    store = open_store(url)
    label = f"[{args.label}] " if args.label else ""
    with stop_on_signals() as stop:
        run_worker(store, args.study, overrides=args.set, device=args.device, label=label,
                   log=_say, progress=_progress(), should_stop=stop, n_workers=args.workers_total or 1)
    return _interrupted(stop) if stop() else 0


def _status(args: argparse.Namespace) -> int:
    status = study_status(open_store(args.storage), args.study)
    if args.json:
        print(json.dumps(status.to_dict(), indent=1))
    else:
        print(f"study {status.name!r} in {status.storage}")
        print(status_table(status))
    return 0


def _export(args: argparse.Namespace) -> int:
    status = study_status(open_store(args.storage), args.study)
    try:
        points, folds = export_csv(status, args.output)
    except OSError as exc:
        raise StorageError(f"cannot write {args.output!r}: {exc.strerror}") from None
    print(f"wrote {points} ({len(status.points)} points) and {folds}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    status = study_status(open_store(args.storage), args.study)
    print(f"wrote {_write_plot(status, args.output, args.prefer)}")
    return 0


def _select(args: argparse.Namespace) -> int:
    selection = select(study_status(open_store(args.storage), args.study), args.prefer)
    print(json.dumps(selection, indent=1) if args.json else format_selection(selection))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.config is None:
        config = paper_figure4_config(args.set)
    else:
        config = load_config(args.config, args.set)
    bench = run_bench(config, rounds=args.rounds, workers=args.loader_workers,
                      log=None if args.json else _say)
    print(json.dumps(bench.to_json(), indent=1) if args.json else format_bench(bench))
    return 0


def _study_args(p: argparse.ArgumentParser, storage_required: bool = True) -> None:
    p.add_argument("--storage", required=storage_required, metavar="URL",
                   help="sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB or journal:FILE")
    p.add_argument("--study", required=True, metavar="NAME")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-search", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lambda-search {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    models = commands.add_parser("models", help="list the networks and their parameter counts")
    models.add_argument("--num-classes", type=_positive_int, default=100)
    models.set_defaults(run=_models)

    search = commands.add_parser("search", help="run (or resume) the lambda search of a study config")
    search.add_argument("config", help="a study config (TOML), e.g. studies/quickstart.toml")
    search.add_argument("--storage", metavar="URL", help="default: sqlite:///<config folder>/<study>.db")
    search.add_argument("--study", metavar="NAME", help="default: study.name, or the config's file name")
    search.add_argument("--workers", type=_workers, help="worker processes, or 'auto': one per CPU core / train.threads "
                        "(per GPU on CUDA); default search.workers, 'auto' unless set")
    search.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (a TOML value, or a plain string)")
    search.set_defaults(run=_search)

    bench = commands.add_parser("bench", help="measure training speed against the official pipeline; project a study")
    bench.add_argument("config", nargs="?", help="a study config (default: the paper's Figure 4 search on "
                       "CIFAR-100-shaped synthetic data, on the GPU if there is one)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--rounds", type=_positive_int, default=7, help="timed rounds (default 7)")
    bench.add_argument("--loader-workers", type=_count, default=None, metavar="N",
                       help="DataLoader workers of the reference pipeline (default: min(4, CPU count))")
    bench.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a config value, e.g. train.device=cpu")
    bench.set_defaults(run=_bench)

    resume = commands.add_parser("resume", help="continue a study from its database alone")
    _study_args(resume)
    resume.add_argument("--workers", type=_workers, help="worker processes, or 'auto' (as search)")
    resume.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="change where or how fast it runs (train.device, data.root, ...)")
    resume.set_defaults(run=_resume)

    worker = commands.add_parser("worker", help="join a running study from another process, GPU or machine")
    _study_args(worker, storage_required=False)
    worker.add_argument("--device", help="torch device for this worker (default: train.device)")
    worker.add_argument("--label", default="", help="a prefix for this worker's lines")
    worker.add_argument("--workers-total", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    worker.set_defaults(run=_worker)

    status = commands.add_parser("status", help="the points of a study: state, folds done, mean +- std")
    _study_args(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(run=_status)

    export = commands.add_parser("export", help="write the per-point and per-fold tables as CSV")
    _study_args(export)
    export.add_argument("-o", "--output", required=True, metavar="FILE.csv")
    export.set_defaults(run=_export)

    prefer_help = ("which end of the one-standard-error candidates to take: 'larger' lambda (SimAM nearer to off, "
                   "the default) or 'smaller'")
    plot = commands.add_parser("plot", help="draw Figure 4: accuracy against lambda (PNG, SVG or PDF)")
    _study_args(plot)
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png")
    plot.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=prefer_help)
    plot.set_defaults(run=_plot)

    sel = commands.add_parser("select", help="choose lambda: best mean, one-SE rule, paired t-tests")
    _study_args(sel)
    sel.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=prefer_help)
    sel.add_argument("--json", action="store_true")
    sel.set_defaults(run=_select)
    return parser


def _in_chain(exc: BaseException | None, test) -> BaseException | None:
    """The first exception in ``exc``'s cause/context chain that passes ``test``."""
    for _ in range(10):
        if exc is None:
            return None
        if test(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"lambda-search: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line  # a warning is one line, as an error is
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        sys.stderr.write(f"lambda-search {args.command}: error: {exc}\n")
        return 2
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"lambda-search {args.command}: error: no space left on the device{where}; free some and run "
                         "the same command again (finished folds and the last good checkpoints are kept)\n")
        return 1
    except Exception as exc:
        if _in_chain(exc, lambda e: "database or disk is full" in str(e)):  # SQLite's SQLITE_FULL
            sys.stderr.write(f"lambda-search {args.command}: error: the study database is full (no space left on "
                             "its device); free some and run the same command again (what was stored is kept)\n")
            return 1
        lost = _in_chain(exc, lambda e: type(e).__name__ in ("OperationalError", "InterfaceError")
                         and type(e).__module__.startswith(("sqlalchemy", "psycopg")))
        if lost:
            reason = redact(str(lost).strip().splitlines()[0] if str(lost).strip() else type(lost).__name__)
            sys.stderr.write(f"lambda-search {args.command}: error: lost the study database ({reason[:200]}); when it "
                             "is back, run the same command again or `lambda-search resume` (finished folds and "
                             "checkpoints are kept)\n")
            return 1
        raise
