"""The ``lambda-search`` command (layer 9 of 9): the flags and help of every command
(``parser``) and the commands themselves (``commands``: parse, call the library, print, map error
types to exit codes). No logic of its own; it may import every other layer, and loads the
training stack only for the commands that train."""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
