"""The ``lambda-search`` command: each command parses, calls the library, prints, and maps
error types to exit codes (0 done, 1 no answer yet or interrupted, 2 bad input, 141 the reader of
its output went away)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import warnings

from .. import __version__
from ..config import ConfigError, final_parts
from ..configfile import load_config
from ..report.evaluation import format_evaluation, format_table2, read_evaluation, read_evaluations
from ..report.evaluation_plot import evaluation_plot_path, plot_evaluation
from ..report.plot import default_plot_path, plot_figure4
from ..report.select import format_selection, nothing_selected, select
from ..report.tables import export_tables, format_studies, status_table, table_text
from ..search.slurm import SlurmError  # (no torch: the submit checks)
from ..store.failures import StorageError, StorageFailure
from ..store.status import StudyError, check_search_name, list_studies, study_status
from ..store.storage import open_store
from . import parser as _parser
from .cluster import run_submit, run_worker
from .common import interrupted as _interrupted
from .common import note as _note
from .common import progress as _progress
from .common import say as _say
from .common import stop_on_signals
from .common import url_of as _url

# The commands that train import the training stack (torch) when they run: the reading
# commands (status, studies, select, plot, export) work where torch is not installed.

USER_ERRORS = (ConfigError, StorageError, StudyError, SlurmError)


def _models(args: argparse.Namespace) -> int:
    """Every registered network, once per shortcut where its family has that option ('-' where
    not), with its parameter count: built on the meta device, so no weight is ever allocated."""
    import torch

    from ..nn.registry import NETWORKS, build_model

    width = max(10, *(len(name) for name in NETWORKS))
    print(f"{'name':<{width}} {'shortcut':>8} {'classes':>8} {'parameters':>12}")
    for name, spec in NETWORKS.items():
        for shortcut in spec.options.get("shortcut", (None,)):
            with torch.device("meta"):
                model = build_model(name, args.num_classes, shortcut=shortcut)
            count = sum(p.numel() for p in model.parameters())
            print(f"{name:<{width}} {shortcut or '-':>8} {args.num_classes:>8} {count:>12,}")
    return 0


def _write_plot(status, path, prefer="larger", make_folder=False, evaluation=None):
    return _written(plot_figure4, status, path, prefer, make_folder, evaluation)


def _written(plot, *args, **kwargs):
    try:
        return plot(*args, **kwargs)
    except OSError as exc:
        raise StorageError(f"cannot write the plot {str(args[1])!r}: {exc.strerror or exc}") from None


def _finish(status, stop) -> int:
    print(status_table(status))
    if stop():
        return _interrupted(stop)
    if not status.finished:
        print(f"{status.total - status.complete} points are not complete; resume with: lambda-search resume "
              f"--storage {status.storage} --study {status.name}", file=sys.stderr)
        return 1
    selection = select(status)
    print()
    print(format_selection(selection))
    print(f"\nFigure 4: {_write_plot(status, default_plot_path(status), make_folder=True)}")
    return _answer(selection)  # (every lambda diverged: finished, but no answer, as select and plot say)


def _search(args: argparse.Namespace) -> int:
    overrides = list(args.set)
    if args.storage is not None:
        overrides.append(f"study.storage={json.dumps(args.storage)}")
    if args.study is not None:
        overrides.append(f"study.name={json.dumps(args.study)}")
    config = load_config(args.config, overrides)
    from ..search.study import dry_run, run_search

    if args.dry_run:
        print("\n".join(dry_run(config)))
        return 0

    with stop_on_signals() as stop:
        _, status = run_search(config, workers=args.workers, log=_say, progress=_progress(), should_stop=stop)
    return _finish(status, stop)


def _resume(args: argparse.Namespace) -> int:
    from ..search.study import resume_config, run_search

    config = resume_config(_url(args), args.study, args.set)
    with stop_on_signals() as stop:
        _, status = run_search(config, workers=args.workers, log=_say, progress=_progress(), should_stop=stop,
                               resume_only=True)
    return _finish(status, stop)


@contextlib.contextmanager
def _stdout_to_stderr(on: bool):
    """With ``on``, what this process and the workers it starts write to standard output goes
    to standard error, so that standard output holds the JSON alone."""
    if not on:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _evaluate(args: argparse.Namespace) -> int:
    from ..search.evaluate import run_evaluation

    log = _say if not args.json else _note  # with --json, stdout holds the JSON alone
    with stop_on_signals() as stop, _stdout_to_stderr(args.json):
        table = run_evaluation(_url(args), args.study, seeds=args.seeds, e_lambda=args.e_lambda,
                               prefer=args.prefer, networks=args.networks, overrides=args.set, workers=args.workers,
                               holm=args.holm, log=log, progress=_progress(), should_stop=stop,
                               dry_run=args.dry_run)
        if args.dry_run:
            return 0
        figures = _evaluation_figures(args, table)
    one = _one_column(table)
    if args.json:
        print(json.dumps(one or table, indent=1))
    else:
        print("\n" + (format_evaluation(one) if one else format_table2(table)))
        print("".join(f"\nfigure: {path}" for path in figures))
    if stop():
        return _interrupted(stop)
    return 0 if table["finished"] else 1


def _one_column(table: dict | None) -> dict | None:
    """The evaluation of the searched network and data, shown with its seeds and cross-validated
    accuracies, where it is what was asked for (``evaluate`` without --networks or data.*) or,
    for a reading command, all there is; else None (the table is shown as the paper's Table 2)."""
    if not table:
        return None
    searched = next((c for c in table["columns"] if c["column"] is None), None)
    asked = table.get("asked")
    if asked is not None:
        return searched if len(asked) == 1 and final_parts(asked[0])[1] is None else None
    return searched if len(table["columns"]) == 1 else None


def _evaluation_figures(args: argparse.Namespace, table: dict) -> list:
    """The study's figures after an evaluation: the evaluation's, and Figure 4 with its test marks."""
    if not table["columns"]:
        return []
    store = open_store(_url(args))
    status = study_status(store, args.study)
    search_plot = default_plot_path(status)
    paths = [_written(plot_evaluation, table, evaluation_plot_path(search_plot), make_folder=True)]
    evaluation = next((c for c in table["columns"] if c["column"] is None), None)  # (the searched one, as read)
    if evaluation:
        paths.append(_write_plot(status, search_plot, args.prefer, make_folder=True, evaluation=evaluation))
    return paths


def _status(args: argparse.Namespace) -> int:
    store = open_store(_url(args))
    status, evaluation = study_status(store, args.study), read_evaluation(store, args.study)
    table = read_evaluations(store, args.study)
    if args.json:
        print(json.dumps({**status.to_dict(), "evaluation": evaluation, "evaluations": table}, indent=1))
    else:
        print(f"study {status.name!r} in {status.storage}")
        print(status_table(status))
        if table:
            one = _one_column(table)
            print("\n" + (format_evaluation(one) if one else format_table2(table)))
    return 0


def _studies(args: argparse.Namespace) -> int:
    store = open_store(_url(args))
    studies = list_studies(store)
    if args.json:
        print(json.dumps(studies, indent=1))
        return 0
    print(format_studies(studies, store.shown))
    return 0


def _delete(args: argparse.Namespace) -> int:
    from ..search.delete import carry_out, plan_delete

    store = open_store(_url(args), write=not args.dry_run)
    plan = plan_delete(store, args.study)
    print(plan.describe())
    if args.dry_run:
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise ConfigError("delete asks before it deletes, and no one can answer here: give --yes to delete "
                              "without asking (or --dry-run to list)")
        if input("delete all of it? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return 1
    carry_out(store, plan)
    print(f"deleted study {args.study!r}")
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
    store = open_store(_url(args))
    status, evaluation = study_status(store, args.study), read_evaluation(store, args.study)
    prefer = args.prefer or (evaluation or {}).get("prefer") or "larger"  # (the lambda evaluate chose, starred)
    print(f"wrote {_write_plot(status, args.output, prefer, evaluation=evaluation)}")
    return _answer(select(status, prefer))


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
    from ..bench.run import format_bench, paper_figure4_config, run_bench  # only here: workers never load it

    if args.config is None:
        config = paper_figure4_config(args.set)
    else:
        config = load_config(args.config, args.set)
    bench = run_bench(config, rounds=args.rounds, workers=args.loader_workers,
                      log=None if args.json else _say)
    print(json.dumps(bench.to_json(), indent=1) if args.json else format_bench(bench))
    return 0


READS_A_SEARCH = ("resume", "status", "select", "plot", "export")  # (a final evaluation's study is read by status)
COMMANDS = {"search": _search, "resume": _resume, "evaluate": _evaluate, "worker": run_worker, "submit": run_submit,
            "bench": _bench, "delete": _delete, "studies": _studies, "status": _status, "select": _select,
            "plot": _plot, "export": _export, "models": _models}


def build_parser() -> argparse.ArgumentParser:
    return _parser.build_parser(__version__)


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
        if args.command in READS_A_SEARCH:
            check_search_name(args.study, args.command)
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except USER_ERRORS as exc:
        sys.stderr.write(f"lambda-search {args.command}: error: {exc}\n")
        return 2
    except StorageFailure as exc:
        sys.stderr.write(f"lambda-search {args.command}: error: {exc}\n")
        return 1
    except KeyboardInterrupt:  # Ctrl-C before a command set its own handlers (or a second one): nothing half-stored
        sys.stderr.write(f"lambda-search {args.command}: interrupted; run the same command again to go on\n")
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader went away (| head): stop quietly, as Unix tools do
        _quiet_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a tool a closed pipe stopped


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that Python's flush at exit hits no closed pipe."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
