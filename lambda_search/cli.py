"""The ``lambda-search`` command: each command parses, calls the library, prints, and maps
error types to exit codes (0 done, 1 no answer yet or interrupted, 2 bad input)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import warnings

from . import (
    MODEL_NAMES,
    ConfigError,
    StorageError,
    StorageFailure,
    StudyError,
    __version__,
    build_model,
    export_tables,
    format_selection,
    list_studies,
    load_config,
    open_store,
    plot_figure4,
    resume_config,
    run_search,
    run_worker,
    select,
    status_table,
    study_status,
)
from ._plot import default_plot_path
from ._report import format_studies, table_text
from ._select import nothing_selected
from ._status import STORAGE_ENV

USER_ERRORS = (ConfigError, StorageError, StudyError)


class _Stop:
    """A flag set by SIGINT or SIGTERM; a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal = None

    def __call__(self) -> bool:
        return self.signal is not None

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum


@contextlib.contextmanager
def stop_on_signals():
    """Within the block, SIGINT and SIGTERM ask for a clean stop: the fold in flight saves
    its checkpoint, the trial is marked interrupted and the process can exit."""
    stop = _Stop()
    previous = {s: signal.signal(s, stop.handle) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


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
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)  # never wraps, however narrow
        sys.stderr.write("\r" + text[:width].ljust(width) + "\r")
        sys.stderr.flush()
    return show


def _interrupted(stop) -> int:
    print("interrupted: finished folds and checkpoints are kept; run the same command again to resume",
          file=sys.stderr)
    return 128 + int(stop.signal)


def _write_plot(status, path, prefer="larger", make_folder=False):
    try:
        return plot_figure4(status, path, prefer, make_folder)
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
    print(f"\nFigure 4: {_write_plot(status, default_plot_path(status), make_folder=True)}")
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


def _url(args: argparse.Namespace) -> str:
    url = args.storage or os.environ.get(STORAGE_ENV)
    if not url:
        raise StorageError(f"{args.command} needs --storage URL (or the {STORAGE_ENV} environment variable)")
    return url


def _resume(args: argparse.Namespace) -> int:
    config = resume_config(_url(args), args.study, args.set)
    with stop_on_signals() as stop:
        _, status = run_search(config, workers=args.workers, log=_say, progress=_progress(), should_stop=stop,
                               resume_only=True)
    return _finish(status, stop)


def _worker(args: argparse.Namespace) -> int:
    store = open_store(_url(args), write=True)
    label = f"[{args.label}] " if args.label else ""
    with stop_on_signals() as stop:
        counts = run_worker(store, args.study, overrides=args.set, device=args.device, label=label,
                            log=_say, progress=_progress(), should_stop=stop, n_workers=args.workers_total or 1)
    if stop():
        return _interrupted(stop)
    status = study_status(store, args.study)
    ran = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no point"
    _say(f"{label}worker done: ran {ran}; study {args.study!r}: {status.complete} of {status.total} points complete"
         + (", finished" if status.finished else ""))
    return 0


def _status(args: argparse.Namespace) -> int:
    status = study_status(open_store(_url(args)), args.study)
    if args.json:
        print(json.dumps(status.to_dict(), indent=1))
    else:
        print(f"study {status.name!r} in {status.storage}")
        print(status_table(status))
    return 0


def _studies(args: argparse.Namespace) -> int:
    store = open_store(_url(args))
    studies = list_studies(store)
    if args.json:
        print(json.dumps(studies, indent=1))
        return 0
    print(format_studies(studies, store.shown))
    return 0


def _export(args: argparse.Namespace) -> int:
    status = study_status(open_store(_url(args)), args.study)
    if args.output == "-":
        sys.stdout.write(table_text(status, folds=args.folds, fmt=args.format or "csv"))
        return 0
    try:
        written = export_tables(status, args.output, folds_only=args.folds, fmt=args.format)
    except OSError as exc:
        raise StorageError(f"cannot write {args.output!r}: {exc.strerror}") from None
    print("wrote " + " and ".join(str(p) for p in written) + f" ({len(status.points)} points)")
    return 0


def _plot(args: argparse.Namespace) -> int:
    status = study_status(open_store(_url(args)), args.study)
    print(f"wrote {_write_plot(status, args.output, args.prefer)}")
    return _answer(select(status, args.prefer))


def _select(args: argparse.Namespace) -> int:
    selection = select(study_status(open_store(_url(args)), args.study), args.prefer)
    print(json.dumps(selection, indent=1) if args.json else format_selection(selection))
    return _answer(selection)


def _answer(selection: dict) -> int:
    """0 where a lambda is chosen, 1 where nothing can be chosen yet (said on stderr)."""
    if selection["one_se"] is not None:
        return 0
    print(f"lambda-search: {nothing_selected(selection)}", file=sys.stderr)
    return 1


def _bench(args: argparse.Namespace) -> int:
    from ._bench import format_bench, paper_figure4_config, run_bench  # only here: workers never load it

    if args.config is None:
        config = paper_figure4_config(args.set)
    else:
        config = load_config(args.config, args.set)
    bench = run_bench(config, rounds=args.rounds, workers=args.loader_workers,
                      log=None if args.json else _say)
    print(json.dumps(bench.to_json(), indent=1) if args.json else format_bench(bench))
    return 0


DESCRIPTION = """Choose SimAM's lambda by cross-validation, as the SimAM paper's Figure 4: train the
network with SimAM on k-fold splits of the training set for every lambda of a log-scale
pool, store each fold in an Optuna study, and select lambda with the one-standard-error rule.

Exit codes: 0 done; 1 no answer yet (a study not finished, nothing to select) or
interrupted; 2 bad input (one line on stderr, nothing stored is changed)."""

EPILOG = ("Start with: lambda-search search studies/quickstart.toml. Every command that names a stored study takes "
          "--storage URL, or the LAMBDA_SEARCH_STORAGE environment variable when --storage is not given (search "
          "takes its storage from --storage or the config only).")
STORAGE_HELP = ("sqlite:///FILE, postgresql://USER:PASSWORD@HOST/DB or journal:FILE "
                "(default: the LAMBDA_SEARCH_STORAGE environment variable)")
PREFER_HELP = ("which end of the one-standard-error candidates to take: 'larger' lambda (SimAM nearer to off, "
               "the default) or 'smaller'")


def _study_args(p: argparse.ArgumentParser, study: bool = True) -> None:
    p.add_argument("--storage", metavar="URL", help=STORAGE_HELP)
    if study:
        p.add_argument("--study", required=True, metavar="NAME", help="the study's name (`studies` lists them)")


def _set_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help=what)


def _run_commands(commands) -> None:
    search = commands.add_parser("search", help="run (or resume) the lambda search of a study config")
    search.add_argument("config", help="a study config (TOML), e.g. studies/quickstart.toml")
    search.add_argument("--storage", metavar="URL", help="default: study.storage, else sqlite:///<config folder>/"
                        "<study>.db (LAMBDA_SEARCH_STORAGE is not used: a config names its study)")
    search.add_argument("--study", metavar="NAME", help="default: study.name, or the config's file name")
    search.add_argument(
        "--workers",
        type=_workers,
        help="worker processes, or 'auto': one per CPU core / train.threads "
        "(per GPU on CUDA); default search.workers, 'auto' unless set",
    )
    _set_arg(search, "override a config value (a TOML value, or a plain string); repeatable")
    search.set_defaults(run=_search)

    resume = commands.add_parser("resume", help="continue a study from its database alone")
    _study_args(resume)
    resume.add_argument("--workers", type=_workers, help="worker processes, or 'auto' (as search)")
    _set_arg(resume, "change where or how fast it runs (train.device, data.root, study.checkpoint_dir, ...)")
    resume.set_defaults(run=_resume)

    worker = commands.add_parser("worker", help="join a running study from another process, GPU or machine")
    _study_args(worker)
    worker.add_argument("--device", help="torch device for this worker: cpu, cuda or cuda:N (default: train.device)")
    worker.add_argument("--label", default="", help="a prefix for this worker's lines")
    worker.add_argument("--workers-total", type=int, default=0, help=argparse.SUPPRESS)
    _set_arg(worker, "change where or how fast it runs, as resume")
    worker.set_defaults(run=_worker)

    bench = commands.add_parser("bench", help="measure training speed against the official pipeline; project a study")
    bench.add_argument("config", nargs="?", help="a study config (default: the paper's Figure 4 search on "
                       "CIFAR-100-shaped synthetic data, on the GPU if there is one)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--rounds", type=_positive_int, default=7, help="timed rounds (default 7)")
    bench.add_argument("--loader-workers", type=_count, default=None, metavar="N",
                       help="DataLoader workers of the reference pipeline (default: min(4, CPU count))")
    _set_arg(bench, "override a config value, e.g. train.device=cpu")
    bench.set_defaults(run=_bench)


def _read_commands(commands) -> None:
    studies = commands.add_parser("studies", help="list the studies of a storage, with their companions")
    _study_args(studies, study=False)
    studies.add_argument("--json", action="store_true", help="print the list as JSON")
    studies.set_defaults(run=_studies)

    status = commands.add_parser("status", help="the points of a study: state, folds done, mean +- std")
    _study_args(status)
    status.add_argument("--json", action="store_true", help="print every point and fold as JSON")
    status.set_defaults(run=_status)

    sel = commands.add_parser("select", help="choose lambda: best mean, one-SE rule, paired t-tests "
                              "(exit 1 when nothing can be chosen yet)")
    _study_args(sel)
    sel.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=PREFER_HELP)
    sel.add_argument("--json", action="store_true", help="print the selection as JSON")
    sel.set_defaults(run=_select)

    plot = commands.add_parser("plot", help="draw Figure 4: accuracy against lambda (PNG, SVG or PDF; exit 1 when "
                               "it shows no chosen lambda yet)")
    _study_args(plot)
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the picture: .png, .svg or .pdf")
    plot.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=PREFER_HELP)
    plot.set_defaults(run=_plot)

    export = commands.add_parser("export", help="write the per-point and per-fold tables (CSV or JSON)")
    _study_args(export)
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="FILE.csv or FILE.json (the per-fold table goes beside it, FILE.folds.csv or .json), "
                        "or - for standard output (one table)")
    export.add_argument("--folds", action="store_true", help="write only the per-fold table")
    export.add_argument("--format", choices=("csv", "json"), help="the format (default: FILE's extension; csv for -)")
    export.set_defaults(run=_export)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-search", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lambda-search {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _run_commands(commands)
    _read_commands(commands)
    models = commands.add_parser("models", help="list the networks and their parameter counts")
    models.add_argument(
        "--num-classes", type=_positive_int, default=100, help="classes of the last layer (default 100)"
    )
    models.set_defaults(run=_models)
    return parser


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"lambda-search: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _one_line  # a warning is one line, as an error is
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # no command: the list of commands, and a usage error
        parser.print_help()
        sys.stderr.write("lambda-search: error: a command is required (listed above)\n")
        return 2
    try:
        return args.run(args)
    except USER_ERRORS as exc:
        sys.stderr.write(f"lambda-search {args.command}: error: {exc}\n")
        return 2
    except StorageFailure as exc:
        sys.stderr.write(f"lambda-search {args.command}: error: {exc}\n")
        return 1
