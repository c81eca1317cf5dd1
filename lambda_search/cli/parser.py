"""The command line's grammar: every command, flag and help text of ``lambda-search``, and
argparse made to say a usage error in one line (exit 2). ``cli`` runs what it parses."""

from __future__ import annotations

import argparse
import sys

__all__ = ["build_parser"]


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",")]


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
    _search_args(search)
    search.add_argument(
        "--workers",
        type=_workers,
        help="worker processes, or 'auto': one per CPU core / train.threads "
        "(per GPU on CUDA); default search.workers, 'auto' unless set",
    )
    search.add_argument("--dry-run", action="store_true",
                        help="check everything, print what it would train and the projected time; store nothing")

    resume = commands.add_parser("resume", help="continue a study from its database alone")
    _study_args(resume)
    resume.add_argument("--workers", type=_workers, help="worker processes, or 'auto' (as search)")
    _set_arg(resume, "change where or how fast it runs (train.device, data.root, study.checkpoint_dir, ...)")

    evaluate = commands.add_parser("evaluate", help="train the chosen lambda and the baseline on the whole training "
                                   "set, seed by seed, and report test accuracy (the paper's Table 2)")
    _evaluate_args(evaluate)
    evaluate.add_argument("--workers", type=_workers, help="worker processes, or 'auto' (as search)")
    evaluate.add_argument("--dry-run", action="store_true",
                          help="check everything, print what it would train and the projected time; store nothing")
    evaluate.add_argument("--holm", action="store_true",
                          help="also correct the columns' p-values for their number (Holm's step-down method)")
    evaluate.add_argument("--json", action="store_true",
                          help="print the evaluation, every seed, as JSON (progress on stderr)")

    worker = commands.add_parser("worker", help="join a running study from another process, GPU or machine")
    _study_args(worker, study=False)
    worker.add_argument("--study", required=True, action="append", metavar="NAME",
                        help="the study's name; repeated: each in turn, the next once one is finished")
    worker.add_argument("--device", help="torch device for this worker: cpu, cuda or cuda:N (default: train.device)")
    worker.add_argument("--label", default="", help="a prefix for this worker's lines")
    worker.add_argument("--workers-total", type=int, default=0, help=argparse.SUPPRESS)
    worker.add_argument("--max-requeues", type=_count, metavar="N",
                        help="in a Slurm job: on SIGUSR1 (Slurm's warning before a time limit) stop as on SIGTERM, "
                        "then requeue this task, unless it was requeued N times already")
    _set_arg(worker, "change where or how fast it runs, as resume")


def _search_args(search: argparse.ArgumentParser) -> None:
    search.add_argument("config", help="a study config (TOML), e.g. studies/quickstart.toml")
    search.add_argument("--storage", metavar="URL", help="default: study.storage, else sqlite:///<config folder>/"
                        "<study>.db (LAMBDA_SEARCH_STORAGE is not used: a config names its study)")
    search.add_argument("--study", metavar="NAME", help="default: study.name, or the config's file name")
    _set_arg(search, "override a config value (a TOML value, or a plain string); repeatable")


def _evaluate_args(evaluate: argparse.ArgumentParser) -> None:
    _study_args(evaluate)
    evaluate.add_argument("--seeds", type=_positive_int, default=3,
                          help="trainings per network, seed by seed, the same seeds for both (default 3)")
    evaluate.add_argument("--lambda", dest="e_lambda", type=float, metavar="X",
                          help="evaluate lambda X instead of the one-SE rule's choice (the output says so)")
    evaluate.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=PREFER_HELP)
    evaluate.add_argument("--networks", type=_names, metavar="A,B,...",
                          help="evaluate these networks instead of the searched one (`models` lists them), each a "
                               "column of the table")
    _set_arg(evaluate, "change where or how fast it runs, as resume; data.* (data.dataset, data.root, "
                       "data.options...): evaluate on that data set instead of the searched one")


def _slurm_args() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("the Slurm job array")
    g.add_argument("--tasks", type=_positive_int, required=True, metavar="N", help="workers: tasks of the job array")
    g.add_argument("--partition", help="sbatch --partition")
    g.add_argument("--gpus-per-task", type=_count, metavar="N", help="GPUs of each task (sbatch --gpus-per-task)")
    g.add_argument("--cpus-per-task", type=_positive_int, metavar="N", help="CPU cores of each task")
    g.add_argument("--mem", help="memory of each task, e.g. 32G")
    g.add_argument("--time", help="time limit of each task, e.g. 1-00:00:00, 12:00:00 or 240 (minutes)")
    g.add_argument("--account", help="sbatch --account")
    g.add_argument("--qos", help="sbatch --qos")
    g.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                   help="another sbatch option, e.g. --sbatch=--constraint=a100 (repeatable)")
    g.add_argument("--setup", action="append", default=[], metavar="LINE",
                   help="a shell line each task runs before its worker, e.g. --setup 'module load cuda' "
                        "--setup 'source ~/venv/bin/activate' (repeatable)")
    g.add_argument("--python", metavar="PATH", help="the Python on the nodes that has lambda_search (default: this "
                   "one)")
    g.add_argument("--logs", default="slurm-logs", metavar="DIR", help="the tasks' logs (default ./slurm-logs)")
    g.add_argument("--max-requeues", type=_count, default=3, metavar="N",
                   help="times a task requeues itself on Slurm's warning (default 3)")
    g.add_argument("--warn-seconds", type=_count, default=120, metavar="S",
                   help="Slurm warns each task (SIGUSR1) S seconds before its time limit: it saves its checkpoint "
                        "and requeues itself (default 120; 0: no warning)")
    g.add_argument("--node", metavar="NAME", help="run every task on this one node (then SQLite, a local journal "
                   "and local folders are fine)")
    g.add_argument("--job-name", help="default: ls-<study>")
    g.add_argument("--print", dest="print_only", action="store_true",
                   help="print the batch script only: nothing is stored or submitted")
    return p


def _submit_commands(commands) -> None:
    submit = commands.add_parser("submit", help="run a study's workers as a Slurm job array (search, resume or "
                                 "evaluate on a cluster)")
    what = submit.add_subparsers(dest="submit", metavar="WHAT", parser_class=_Parser, required=True,
                                 help="what the workers run: search, resume or evaluate")
    slurm = _slurm_args()
    _search_args(what.add_parser("search", parents=[slurm], help="the search of a study config"))
    resume = what.add_parser("resume", parents=[slurm], help="a stored study, from its database alone")
    _study_args(resume)
    _set_arg(resume, "change where or how fast it runs (train.device, data.root, study.checkpoint_dir, ...)")
    _evaluate_args(what.add_parser("evaluate", parents=[slurm], help="the final evaluation of a finished search"))

    bench = commands.add_parser("bench", help="measure training speed against the official pipeline; project a study")
    bench.add_argument("config", nargs="?", help="a study config (default: the paper's Figure 4 search on "
                       "CIFAR-100-shaped synthetic data, on the GPU if there is one)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    bench.add_argument("--rounds", type=_positive_int, default=7, help="timed rounds (default 7)")
    bench.add_argument("--loader-workers", type=_count, default=None, metavar="N",
                       help="DataLoader workers of the reference pipeline (default: min(4, CPU count))")
    _set_arg(bench, "override a config value, e.g. train.device=cpu")


def _read_commands(commands) -> None:
    studies = commands.add_parser("studies", help="list the studies of a storage, with their companions")
    _study_args(studies, study=False)
    studies.add_argument("--json", action="store_true", help="print the list as JSON")

    status = commands.add_parser("status", help="the points of a study: state, folds done, mean +- std")
    _study_args(status)
    status.add_argument("--json", action="store_true", help="print every point and fold as JSON")

    sel = commands.add_parser("select", help="choose lambda: best mean, one-SE rule, paired t-tests "
                              "(exit 1 when nothing can be chosen yet)")
    _study_args(sel)
    sel.add_argument("--prefer", choices=("larger", "smaller"), default="larger", help=PREFER_HELP)
    sel.add_argument("--json", action="store_true", help="print the selection as JSON")

    plot = commands.add_parser("plot", help="draw Figure 4: accuracy against lambda (PNG, SVG or PDF; exit 1 when "
                               "it shows no chosen lambda yet)")
    _study_args(plot)
    plot.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the picture: .png, .svg or .pdf")
    plot.add_argument("--prefer", choices=("larger", "smaller"),
                      help=PREFER_HELP + "; default: as the study's final evaluation chose, else larger")

    delete = commands.add_parser("delete", help="delete a study with its companions, checkpoints and plots "
                                 "(asks first)")
    _study_args(delete)
    delete.add_argument("--yes", action="store_true", help="delete without asking (for scripts)")
    delete.add_argument("--dry-run", action="store_true", help="only list what would be deleted")

    export = commands.add_parser("export", help="write the per-point and per-fold tables (CSV or JSON)")
    _study_args(export)
    export.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="FILE.csv or FILE.json (the per-fold table goes beside it, FILE.folds.csv or .json), "
                        "or - for standard output (one table)")
    export.add_argument("--folds", action="store_true", help="write only the per-fold table")
    export.add_argument("--format", choices=("csv", "json"), help="the format (default: FILE's extension; csv for -)")


def build_parser(version: str) -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-search", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lambda-search {version}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _run_commands(commands)
    _submit_commands(commands)
    _read_commands(commands)
    models = commands.add_parser("models", help="list the networks and their parameter counts")
    models.add_argument(
        "--num-classes", type=_positive_int, default=100, help="classes of the last layer (default 100)"
    )
    return parser
