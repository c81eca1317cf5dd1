"""The ``lambda-search`` command. It holds no logic: each command parses, calls the library, prints."""

from __future__ import annotations

import argparse
import sys

from . import MODEL_NAMES, __version__, build_model


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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lambda-search", description=__doc__)
    parser.add_argument("--version", action="version", version=f"lambda-search {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    models = commands.add_parser("models", help="list the networks and their parameter counts")
    models.add_argument("--num-classes", type=_positive_int, default=100)
    models.set_defaults(run=_models)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
