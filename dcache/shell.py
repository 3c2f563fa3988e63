"""`dcache shell`: an interactive REPL over the same commands as the CLI.

The command table is the CLI's own: each line is split with shell rules
and parsed by the very click command that ``dcache CMD`` uses, so options,
checks and ``help CMD`` cannot drift apart. The command then runs on the
shell's open connection (see :meth:`ShellSession.run`). A few commands exist
only here (:data:`SHELL_COMMANDS`). When stdin is not a terminal the shell
reads commands line by line, prints one result per line, and exits non-zero
if any command failed.
"""

from __future__ import annotations

import functools
import json
import os
import select
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
from prompt_toolkit import PromptSession
from prompt_toolkit.buffer import Buffer, CompletionState
from prompt_toolkit.completion import (
    CompleteEvent,
    Completer,
    Completion,
    get_common_complete_suffix,
)
from prompt_toolkit.document import Document
from prompt_toolkit.filters import emacs_insert_mode, vi_insert_mode
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.input import Input
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.output import Output
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import commands, shellwords
from .client import DEFAULT_TIMEOUT, SyncClient, access_for
from .codec import MAX_NAMESPACE_BYTES, Limits
from .commands import Outcome, show_value
from .errors import ConnectError, ConnectionLost, DcacheError
from .shellwords import Word

EXIT = object()  # what a line returns to end the session


@dataclass(frozen=True, slots=True)
class ShellCommand:
    usage: str
    summary: str


SHELL_COMMANDS = {
    "help": ShellCommand("help [COMMAND]", "List the commands, or show one command's options."),
    "use": ShellCommand("use [NAMESPACE]", "Work in NAMESPACE from now on (commands' --ns); with none, the default namespace."),
    "exit": ShellCommand("exit", "Leave the shell (also quit or Ctrl-D)."),
}
ALIASES = {"del": "delete", "quit": "exit", "?": "help"}
NOT_IN_SHELL = {
    "serve": "run it from your terminal",
    "shell": "you are in it",
    "cluster": "run it from your terminal",
    "bench": "run it from your terminal",
    "completion": "run it from your terminal",
}


CONNECTION_OPTIONS = ("--server", "-s", "--timeout")
COMPLETION_KEYS = 50  # keys offered by Tab, asked of the node with a scan
COMPLETION_PAGES = 4  # pages of that scan at most


def command_group() -> click.Group:
    """The shell's commands, parsed as the one-shot CLI parses them, without
    the connection options (the shell keeps its own connection)."""
    group = click.Group("dcache", context_settings=commands.CONTEXT_SETTINGS)
    for command in commands.COMMANDS.values():
        group.add_command(commands.click_command(command, for_shell=True))
    return group


def history_path() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(state) / "dcache" / "history"


class ShellSession:
    """One shell: its connection, what it has seen, and how it prints."""

    def __init__(
        self,
        address: str,
        *,
        console: Console,
        interactive: bool,
        timeout: float = DEFAULT_TIMEOUT,
        access: dict[str, Any] | None = None,
    ) -> None:
        self.address = address
        # A wss:// address's TLS goes to the other members too (their addresses come without a scheme).
        self.access = access_for(address, **(access or {"token": None, "tls": None}))[1]
        self.console = console
        self.interactive = interactive
        self.timeout = timeout
        self.client: SyncClient | None = None
        self.known_addresses: list[str] = [address]
        self.seen_keys: set[str] = set()
        self.namespace = ""  # what `use` chose: the --ns of commands that do not give one
        self._scanned: tuple[str, str, list[str] | None] = ("", "", None)  # the last complete scan for Tab: ns, prefix, keys
        self.group = command_group()
        self.failures = 0
        self.worst_status = 0
        self.connect_status = commands.EXIT_UNAVAILABLE  # what the last failed connect means for the exit status

    # -- connection --------------------------------------------------------------

    def connect(self) -> bool:
        """Connect to the current address, else to another known member."""
        candidates = [self.address] + [a for a in self.known_addresses if a != self.address]
        last_error: Exception | None = None
        for address in candidates:
            try:
                self.client = SyncClient(address, timeout=self.timeout, token=self.access.token, tls=self.access.tls)
            except (DcacheError, ValueError) as exc:
                last_error = exc
                continue
            self.address = address
            self._learn_members()
            return True
        self.client = None
        # Exit 3 when a node refused (a token), 2 when none could be reached.
        self.connect_status = (
            commands.failure(last_error).exit_code if isinstance(last_error, DcacheError) else commands.EXIT_UNAVAILABLE
        )
        self.error(str(last_error))  # ConnectError says "cannot connect to HOST:PORT: why"
        return False

    def _learn_members(self) -> None:
        assert self.client is not None
        try:
            view = self.client.members()
        except DcacheError:
            return
        for member in view.get("members", []):
            address = member.get("client")
            if address and address not in self.known_addresses:
                self.known_addresses.append(address)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None

    def _lost(self, exc: DcacheError) -> None:
        self.error(f"lost the connection to {self.address}: {exc}")
        if self.client is not None:
            try:
                self.client.close()
            except OSError:
                pass
        self.client = None
        if self.connect():
            self.note(f"reconnected to {self.address}")

    # -- running commands ----------------------------------------------------------

    def run(self, command: Callable[..., Outcome], *, as_json: bool, **args: Any) -> int:
        """Run one of :mod:`dcache.commands` on this shell's connection; print it; return its status."""
        self._scanned = ("", "", None)  # (it may change the keys)
        if self.client is None and not self.connect():
            return self.connect_status
        assert self.client is not None
        for name in ("key", "keys"):
            if name in args:
                self.seen_keys.update([args[name]] if name == "key" else args[name])
        try:
            outcome = command(self.client, **args)
        except (ConnectionLost, ConnectError) as exc:
            self._lost(exc)
            return commands.EXIT_UNAVAILABLE
        except DcacheError as exc:
            outcome = commands.failure(exc)
        except ValueError as exc:
            outcome = commands.bad_input(exc)
        self.show(command, outcome, as_json=as_json)
        return outcome.exit_code

    def execute(self, line: str) -> object:
        """Run one line; return its exit status, None for a blank line, or EXIT."""
        limits = self.client.limits if self.client is not None else Limits()
        try:
            words = split_line(line, max_word=max(limits.max_key_bytes, limits.max_value_bytes))
        except ValueError as exc:
            return self._status(self.error(f"cannot parse the line: {exc}"))
        if not words:
            return None
        name, args = ALIASES.get(words[0].text, words[0].text), words[1:]
        if name == "exit":
            return EXIT
        if name == "help":
            return self._status(self.help([word.text for word in args]))
        if name == "use":
            return self._status(self.use([word.text for word in args]))
        if name in NOT_IN_SHELL:
            return self._status(self.error(f"{name}: not in the shell; {NOT_IN_SHELL[name]}"))
        command = self.group.commands.get(name)
        if command is None:
            return self._status(self.error(f"unknown command {name!r}; `help` lists them"))
        return self._status(self._invoke(command, name, expand_shorthand(command, args)))

    def _invoke(self, command: click.Command, name: str, args: list[str]) -> int:
        """Parse ``args`` as the command table says, then run the command here."""
        try:
            with command.make_context(name, list(args)) as ctx:  # (a copy: click empties the list)
                params = dict(ctx.params)
        except click.exceptions.Exit as exc:  # --help printed
            return exc.exit_code
        except click.NoSuchOption as exc:
            if exc.option_name in CONNECTION_OPTIONS:
                return self.error(
                    f"{exc.option_name}: not in the shell, which keeps its connection; "
                    "`dcache shell HOST:PORT --timeout S` sets both"
                )
            return self.error(f"{name}: {exc.format_message()}")
        except click.ClickException as exc:
            return self.error(f"{name}: {exc.format_message()}")
        as_json = params.pop("as_json", False)
        if params.get("ns") == "" and "--ns" not in args and not any(a.startswith("--ns=") for a in args):
            params["ns"] = self.namespace
        action = commands.COMMANDS[name].action
        if action is None:  # run by the shell itself
            return self.top(**params) if name == "top" else self.watch(as_json=as_json, **params)
        spec = commands.COMMANDS[name]
        if spec.confirm is not None:
            try:
                question = spec.confirm(params)
            except click.UsageError as exc:
                return self.error(f"{name}: {exc.format_message()}")
            if question is not None and not params["yes"]:
                if not self.interactive:
                    return self.error(f"{name}: add --yes to do it in a script")
                if not click.confirm(question, default=False):
                    self.note("not done")
                    return commands.EXIT_NOT_FOUND
        if spec.json_arg:
            action = functools.partial(action, as_json=as_json)
        return self.run(action, as_json=as_json, **params)

    def use(self, args: list[str]) -> int:
        if len(args) > 1:
            return self.error("use takes one namespace (or none, for the default one)")
        name = args[0] if args else ""
        if len(name.encode()) > MAX_NAMESPACE_BYTES:
            return self.error(f"a namespace is at most {MAX_NAMESPACE_BYTES} bytes")
        self.namespace = name
        if self.interactive:
            self.note(f"in namespace {name!r}" if name else "in the default namespace")
        return 0

    def keys_like(self, prefix: str, *, ns: str | None = None, count: int = COMPLETION_KEYS) -> list[str]:
        """Up to ``count`` keys that start with ``prefix``, from the node (a
        scan) when connected, with the keys seen in this session."""
        keys = {key for key in self.seen_keys if key.startswith(prefix)}
        ns = self.namespace if ns is None else ns
        cached_ns, cached_prefix, cached = self._scanned
        if cached is not None and cached_ns == ns and prefix.startswith(cached_prefix):
            keys.update(key for key in cached if key.startswith(prefix))  # (that scan found every key it could)
        elif self.client is not None:
            found: list[bytes] = []
            cursor = None
            try:
                for _ in range(COMPLETION_PAGES):  # (a page may end early, with few keys, on a large node)
                    page, cursor = self.client.scan_page(cursor, prefix=prefix, ns=ns, limit=count - len(found))
                    found.extend(page)
                    if cursor is None or len(found) >= count:
                        break
            except (DcacheError, ValueError):
                cursor = True
            texts = [key.decode("utf-8", "replace") for key in found]
            self._scanned = (ns, prefix, texts if cursor is None else None)
            keys.update(texts)
        return sorted(keys)[:count]

    def prompt(self) -> str:
        return f"dcache {self.address}{f' [{self.namespace}]' if self.namespace else ''}> "

    def _status(self, status: int) -> int:
        if status:
            self.failures += 1
            self.worst_status = max(self.worst_status, status)
        return status

    # -- printing --------------------------------------------------------------------

    def show(self, command: Callable[..., Outcome], outcome: Outcome, *, as_json: bool) -> None:
        if as_json:
            text = json.dumps(outcome.data, default=str)
            if self.interactive:
                self.console.print_json(text)
            else:
                self._plain(text)
        elif not self.interactive:
            if outcome.stdout is not None:
                self._plain(outcome.stdout)
        elif outcome.table is not None:
            self.console.print(commands.rich_table(outcome.table))
        elif isinstance(outcome.stdout, bytes):  # a value
            self.console.print(show_value(outcome.stdout), markup=False, highlight=False)
        elif command is commands.delete and outcome.exit_code == 0:
            self.console.print(f"(deleted {outcome.data['deleted']})")
        elif outcome.stdout is not None:
            self.console.print(str(outcome.stdout), markup=False, highlight=False)
        if outcome.note:
            if outcome.exit_code >= 2:
                self.error(outcome.note.removeprefix("error: "))
            else:
                self.note(outcome.note)

    def _plain(self, data: str | bytes) -> None:
        out = sys.stdout.buffer
        raw = data if isinstance(data, bytes) else data.encode()
        out.write(raw if raw.endswith(b"\n") else raw + b"\n")
        out.flush()

    def error(self, message: str) -> int:
        if self.interactive:
            self.console.print(Text(f"error: {message}", style="bold red"))
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)
        return 2

    def note(self, message: str) -> None:
        if self.interactive:
            self.console.print(Text(message, style="yellow"))
        else:
            print(message, file=sys.stderr, flush=True)

    # -- shell-only commands ------------------------------------------------------------

    def help(self, args: list[str]) -> int:
        if args:
            name = ALIASES.get(args[0], args[0])
            if name in SHELL_COMMANDS:
                spec = SHELL_COMMANDS[name]
                self.console.print(f"{spec.usage}\n\n  {spec.summary}", markup=False, highlight=False)
                return 0
            command = self.group.commands.get(name)
            if command is None or name in NOT_IN_SHELL:
                return self.error(f"no command {args[0]!r}; `help` lists them")
            with click.Context(command, info_name=name) as ctx:
                self.console.print(command.get_help(ctx), markup=False, highlight=False)
            return 0
        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold cyan")
        table.add_column()
        for name, command in sorted(self.group.commands.items()):
            table.add_row(name, command.get_short_help_str(70))
        for name, spec in SHELL_COMMANDS.items():
            table.add_row(name, spec.summary)
        self.console.print(table)
        self.console.print(
            "`help COMMAND` shows its options; `del` is `delete`; options also take the form ttl=60.",
            markup=False,
            highlight=False,
        )
        return 0

    def watch(self, *, prefix: str, ns: str, as_json: bool) -> int:
        """Print changes to keys that start with ``prefix`` until Ctrl-C."""
        if self.client is None and not self.connect():
            return commands.EXIT_UNAVAILABLE
        assert self.client is not None
        if self.interactive:
            self.note("watching; Ctrl-C stops")
        try:
            for event in self.client.watch(prefix, ns=ns):
                line, notice = commands.watch_line(event, as_json=as_json)
                if notice:
                    self.note(line)
                elif self.interactive:
                    self.console.print(line, markup=False, highlight=False)
                else:
                    self._plain(line)
        except KeyboardInterrupt:
            return 0
        except DcacheError as exc:
            return self.error(str(exc))
        raise AssertionError("a watch ends only by an error or an interrupt")

    def top(self, *, interval: float, iterations: int | None) -> int:
        if self.client is None and not self.connect():
            return commands.EXIT_UNAVAILABLE
        previous: dict[str, tuple[float, int]] = {}

        def snapshot() -> Table:
            assert self.client is not None
            view = self.client.members()
            now = time.monotonic()
            table = Table(title=f"dcache top · {self.address} · epoch {view['epoch']} · q to leave", title_justify="left")
            for column in ("node", "state", "keys", "ops/s", "hit ratio", "memory", "links up", "connections"):
                table.add_column(column, justify="left" if column in ("node", "state") else "right")
            for m in view["members"]:
                s = m.get("stats") or {}
                ops = sum(s.get(k, 0) for k in ("hits", "misses", "sets", "deletes"))
                before = previous.get(m["node"])
                rate = "-" if before is None else f"{(ops - before[1]) / max(1e-9, now - before[0]):,.0f}"
                previous[m["node"]] = (now, ops)
                lookups = s.get("hits", 0) + s.get("misses", 0)
                links = s.get("peer_links") or {}
                table.add_row(
                    m["node"],
                    m["state"],
                    f"{s.get('keys', 0):,}",
                    rate,
                    f"{s['hits'] / lookups:.1%}" if lookups else "-",
                    commands.human_bytes(s.get("process_memory_bytes", 0)),
                    f"{links.get('up', 0)}/{links.get('total', 0)}",
                    str(s.get("connections", "-")),
                )
            return table

        count = 0
        try:
            with (
                _KeyReader(enabled=self.interactive) as keys,
                Live(console=self.console, auto_refresh=False, transient=False) as live,
            ):
                while iterations is None or count < iterations:
                    live.update(snapshot(), refresh=True)
                    count += 1
                    if iterations is not None and count >= iterations:
                        break
                    if keys.wait_for_q(interval):
                        break
        except KeyboardInterrupt:
            pass
        except (ConnectionLost, ConnectError) as exc:
            self._lost(exc)
            return commands.EXIT_UNAVAILABLE
        except DcacheError as exc:
            return self.error(str(exc))
        return 0


class _KeyReader:
    """Reads single keys from a terminal without Enter, so `q` can stop `top`."""

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled and sys.stdin.isatty()
        self._saved: Any = None

    def __enter__(self) -> _KeyReader:
        if self.enabled:
            import termios
            import tty

            self._saved = termios.tcgetattr(sys.stdin)
            tty.setcbreak(sys.stdin)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSADRAIN, self._saved)

    def wait_for_q(self, seconds: float) -> bool:
        if not self.enabled:
            time.sleep(seconds)
            return False
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([sys.stdin], [], [], left)
            if ready and sys.stdin.read(1) in ("q", "Q"):
                return True
        return False


def split_line(line: str, *, max_word: int | None = None) -> list[Word]:
    """Split ``line`` with shell rules (see :mod:`dcache.shellwords`)."""
    return shellwords.split(line, max_word=max_word)


def expand_shorthand(command: Any, args: list[Word]) -> list[str]:
    """Words of :func:`split_line` as the command takes them: ``ttl=60``
    typed bare (no part quoted or escaped), before any ``--``, becomes
    ``--ttl 60`` for the command's own options; every other word stays as
    typed."""
    options = {opt for param in command.params for opt in getattr(param, "opts", []) if opt.startswith("--")}
    out: list[str] = []
    for i, word in enumerate(args):
        if word.text == "--":  # quoted or not, click ends its options there
            return out + [rest.text for rest in args[i:]]
        name, sep, value = word.text.partition("=")
        if sep and not word.quoted and not name.startswith("-") and f"--{name}" in options:
            out += [f"--{name}", value]
        else:
            out.append(word.text)
    return out


class ShellCompleter(Completer):
    """Completes command names, then the command's options and keys: those
    the node has (a scan) and those used in the session."""

    def __init__(self, session: ShellSession) -> None:
        self.session = session

    def get_completions(self, document: Document, complete_event: Any) -> Iterable[Completion]:
        text = document.text_before_cursor
        words = text.split()
        current = "" if not words or text.endswith(" ") else words[-1]
        group = self.session.group
        names = sorted(set(group.commands) - set(NOT_IN_SHELL) | set(SHELL_COMMANDS) | set(ALIASES))
        if len(words) == 0 or (len(words) == 1 and current):
            for name in names:
                if name.startswith(current):
                    yield Completion(name, start_position=-len(current))
            return
        name = ALIASES.get(words[0], words[0])
        if name == "help":
            for candidate in names:
                if candidate.startswith(current):
                    yield Completion(candidate, start_position=-len(current))
            return
        command = group.commands.get(name)
        if current.startswith("-"):
            options = {opt for p in command.params for opt in getattr(p, "opts", [])} if command else set()
            if name == "where":
                options = {"--ns"}
            elif name == "top":
                options = {"--interval", "--iterations"}
            for option in sorted(options):
                if option.startswith(current):
                    yield Completion(option, start_position=-len(current))
            return
        if name in ("use", "help") or command is None or words[-2 if current else -1] == "--ns":
            return  # (a namespace, or nothing to complete)
        ns = None
        if "--ns" in words[:-1]:
            ns = words[words.index("--ns") + 1] if words.index("--ns") + 1 < len(words) else None
        for key in self.session.keys_like(current, ns=ns):
            yield Completion(shellwords.quote(key), start_position=-len(current))


def _history() -> History:
    path = history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        return FileHistory(str(path))
    except OSError:
        return InMemoryHistory()


def make_prompt_session(
    session: ShellSession, *, history: History | None = None, input: Input | None = None, output: Output | None = None
) -> PromptSession[str]:
    """The shell's prompt: history, completion while typing, and a Tab that completes at once."""
    bindings = KeyBindings()

    @bindings.add("tab", filter=vi_insert_mode | emacs_insert_mode)
    def _(event: KeyPressEvent) -> None:
        _complete_now(event.current_buffer)

    return PromptSession(history=history, completer=ShellCompleter(session), key_bindings=bindings, input=input, output=output)


def _complete_now(buffer: Buffer) -> None:
    """Tab: complete from the text as it stands, before the key returns.

    prompt_toolkit's own Tab starts a completion as a background task, and
    a completion gives up if the buffer already has some. When keys arrive
    in one read (a paste, a fast typist: ``ge`` and Tab), Tab's handler
    runs before the completion that typing ``g`` started, so it starts its
    own; that one then finds the typing's completions in place and gives
    up, leaving ``ge`` and a menu. Our completer is quick and synchronous:
    Tab calls it itself. One candidate is inserted; several insert their
    common part and open the menu; a second Tab moves through it.
    """
    state = buffer.complete_state
    if state is not None and state.complete_index is not None:
        buffer.complete_next()
        return
    if buffer.completer is None:
        return
    completions = list(buffer.completer.get_completions(buffer.document, CompleteEvent(completion_requested=True)))
    if len(completions) == 1:
        buffer.apply_completion(completions[0])
    elif completions:
        common = get_common_complete_suffix(buffer.document, completions)
        if common:
            buffer.insert_text(common, fire_event=False)
            completions = [c.new_completion_from_position(len(common)) for c in completions]
        elif state is not None:
            buffer.complete_next()
            return
        buffer.complete_state = CompletionState(buffer.document, completions)
        buffer.on_completions_changed.fire()


def run_interactive(session: ShellSession, prompt_session: PromptSession[str] | None = None) -> int:
    """The REPL: prompt, run, repeat until exit or Ctrl-D. Returns 0."""
    prompt_session = prompt_session or make_prompt_session(session, history=_history())
    session.console.print(
        f"dcache shell, connected to {session.address}. `help` lists the commands, Ctrl-D leaves.",
        markup=False,
        highlight=False,
    )
    while True:
        try:
            line = prompt_session.prompt(session.prompt())
        except KeyboardInterrupt:
            continue
        except EOFError:
            break
        try:
            if session.execute(line) is EXIT:
                break
        except KeyboardInterrupt:
            # The reply may still come: a fresh connection for the next command.
            session.close()
            session.error("cancelled")
    return 0


def run_script(session: ShellSession, lines: Iterable[str]) -> int:
    """Non-interactive: one command per line; the worst status of any command."""
    for line in lines:
        if session.execute(line.rstrip("\n")) is EXIT:
            break
    return session.worst_status


def main(address: str, *, timeout: float, access: dict[str, Any] | None = None) -> int:
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    try:
        session = ShellSession(address, console=Console(), interactive=interactive, timeout=timeout, access=access)
    except ValueError as exc:  # a bad address
        print(f"error: {exc}", file=sys.stderr)
        return commands.EXIT_UNAVAILABLE
    if not session.connect() and not interactive:
        return session.connect_status
    try:
        return run_interactive(session) if interactive else run_script(session, sys.stdin)
    finally:
        session.close()
