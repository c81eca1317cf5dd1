"""The ``lambda-search`` command (layer 9 of 9): the flags and help of every command
(``parser``) and the commands themselves (``commands``: parse, call the library, print, map error
types to exit codes). No logic of its own; it may import every other layer, and loads the
training stack only for the commands that train."""

import sys

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """The entry point: the commands are imported here, so that a Ctrl-C while they load is one
    line too (exit 130), as it is once they run."""
    try:
        from .commands import main as run
    except KeyboardInterrupt:
        sys.stderr.write("lambda-search: interrupted as it started; nothing was done\n")
        return 130
    return run(argv)


def build_parser():
    from .commands import build_parser as build

    return build()
