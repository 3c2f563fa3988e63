"""Shell completion scripts for `dcache`, as checked in under completions/.

Regenerate them with ``python -m dcache.completion completions/``; a test
fails when the checked-in copies are stale. The scripts ask `dcache` itself
for candidates (click's completion protocol, through ``_DCACHE_COMPLETE``),
so commands and options come from the same command table that parses them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROG = "dcache"
COMPLETE_VAR = "_DCACHE_COMPLETE"
FILES = {"bash": "dcache.bash", "zsh": "_dcache", "fish": "dcache.fish"}


def script(shell: str) -> str:
    from click.shell_completion import get_completion_class

    from .cli import app

    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"no completion for the shell {shell!r}")
    return cls(app, {}, PROG, COMPLETE_VAR).source().rstrip("\n") + "\n"


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = directory / name
        path.write_text(script(shell))
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dcache.completion", description="Write the completion scripts for bash, zsh and fish.")
    parser.add_argument("directory", nargs="?", default="completions", help="where to write them (default: completions)")
    for path in write_all(Path(parser.parse_args(argv).directory)):
        print(path)


if __name__ == "__main__":
    main()
