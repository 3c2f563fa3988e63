"""Shell completion scripts for `dcache`, as checked in under completions/.

Regenerate them with ``python -m dcache.completion completions/``; a test
fails when the checked-in copies are stale. The scripts ask `dcache` itself
for candidates (typer's completion protocol), so commands and options come
from the same typer app that parses them.
"""

from __future__ import annotations

import sys
from pathlib import Path

PROG = "dcache"
COMPLETE_VAR = "_DCACHE_COMPLETE"
FILES = {"bash": "dcache.bash", "zsh": "_dcache", "fish": "dcache.fish"}


def script(shell: str) -> str:
    from typer._completion_shared import get_completion_script

    return get_completion_script(prog_name=PROG, complete_var=COMPLETE_VAR, shell=shell).rstrip("\n") + "\n"


def write_all(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = directory / name
        path.write_text(script(shell))
        written.append(path)
    return written


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "completions")):
        print(path)
