"""The README as a new user reads it: its commands do what it says."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def sh_blocks() -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```sh\n(.*?)```", README, re.S)]


def test_the_quick_start_works_pasted_as_it_is() -> None:
    """Pasted whole, the first block must not leave a node in the foreground
    before the commands after it: the node comes last, on its own line."""
    quick_start = sh_blocks()[0]
    commands = [line.split("#")[0].strip() for line in quick_start if line.split("#")[0].strip()]
    assert commands[0].startswith("python3 -m venv .venv") and "pip install -e '.[test]'" in commands[0]
    assert "dcache serve" not in commands[0]
    serving = [i for i, command in enumerate(commands) if "dcache serve" in command]
    assert serving == [len(commands) - 1], commands  # the foreground node last, alone
    assert any(command.endswith("-m pytest") for command in commands)


def test_running_etcd_by_hand_leaves_nothing_in_the_clone() -> None:
    assert "etcd --data-dir" in README
    assert "default.etcd/" in (REPO / ".gitignore").read_text().splitlines()


def test_the_readme_names_every_module() -> None:
    names = {path.name for path in (REPO / "dcache").glob("*.py")} - {"__init__.py", "__main__.py", "errors.py"}
    table = set(re.findall(r"^\| `(\w+\.py)` \|", README, re.M))
    assert names == table, (names - table, table - names)
