"""Shell completion scripts for `dcache`, as checked in under completions/.

Regenerate them with ``dcache completion --write completions/``; a test
fails when the checked-in copies are stale. The scripts ask `dcache` itself
for candidates (click's completion protocol, through ``_DCACHE_COMPLETE``),
so commands and options come from the same command table that parses them.
"""

from __future__ import annotations

from pathlib import Path

import click

PROG = "dcache"
COMPLETE_VAR = "_DCACHE_COMPLETE"
FILES = {"bash": "dcache.bash", "zsh": "_dcache", "fish": "dcache.fish"}


def script(shell: str, app: click.Command) -> str:
    """The completion script of ``app`` (the dcache command) for ``shell``."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    if cls is None:
        raise ValueError(f"no completion for the shell {shell!r}; name one of bash, zsh, fish")
    return cls(app, {}, PROG, COMPLETE_VAR).source().rstrip("\n") + "\n"


def write_all(directory: Path, app: click.Command) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for shell, name in FILES.items():
        path = directory / name
        path.write_text(script(shell, app))
        written.append(path)
    return written
