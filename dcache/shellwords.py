"""Splitting a line of `dcache shell` into words, with shell rules.

The rules are the shell's own, in the subset the REPL needs: blanks part
words; ``'...'`` keeps everything as typed; ``"..."`` too, except that
``\\"`` and ``\\\\`` stand for ``"`` and ``\\``; a backslash outside quotes
keeps the next character as typed; a ``#`` that begins a word begins a
comment. Each :class:`Word` says whether any part of it was quoted or
escaped, so that ``ttl=60`` typed bare can be shorthand for ``--ttl 60``
while ``"ttl=60"`` stays a value.

The time taken is linear in the line's length: a word is collected as a
list of pieces matched by one regular expression and joined once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Possessive quantifiers (*+, ++) keep the regex engine from saving a
# backtracking point per piece, which costs more than linear time on long words.
_BARE = r"[^ \t\r\n'\"\\]++"
_SINGLE = r"'([^']*+)'"
_DOUBLE = r'"([^"\\]*+(?:\\.[^"\\]*+)*+)"'
_ESCAPED = r"\\(.)"
# One word after any blanks (none at the end of the line, or before a quote never closed).
_WORD = re.compile(rf"[ \t\r\n]*+((?:{_BARE}|{_SINGLE}|{_DOUBLE}|{_ESCAPED})++)?", re.DOTALL)
# One piece of a word that has quotes or escapes in it.
_PIECE = re.compile(rf"({_BARE})|{_SINGLE}|{_DOUBLE}|{_ESCAPED}", re.DOTALL)
_DOUBLE_QUOTED_ESCAPE = re.compile(r'\\([\\"])')
# What shlex.quote leaves bare, less "=", so that a quoted word never reads as shorthand.
_UNSAFE = re.compile(r"[^\w@%+:,./-]", re.ASCII)


class LineError(ValueError):
    """A line that cannot be split into words: an unclosed quote, a trailing
    backslash, or a word longer than anything a node takes."""


@dataclass(frozen=True, slots=True)
class Word:
    """One word of a line: its ``text`` with quotes and escapes removed, and
    whether any part of it was ``quoted`` (inside quotes or after a backslash)."""

    text: str
    quoted: bool = False


def split(line: str, *, max_word: int | None = None) -> list[Word]:
    """The words of ``line``; :class:`LineError` if it cannot be split.

    A word longer than ``max_word`` characters is refused: a character is
    at least one byte, so no key or value of that many bytes can be sent.
    """
    limit = max_word if max_word is not None and len(line) > max_word else None
    words: list[Word] = []
    pos, end = 0, len(line)
    while True:
        match = _WORD.match(line, pos)
        assert match is not None  # every part of _WORD may match nothing
        typed = match.group(1)
        pos = match.end()
        if typed is None:
            if pos < end:
                raise _unsplittable(line, pos)
            return words
        if typed.startswith("#"):
            return words
        if "'" in typed or '"' in typed or "\\" in typed:
            word = Word(_unquote(typed), True)
        else:
            word = Word(typed, False)
        if limit is not None and len(word.text) > limit:
            raise LineError(
                f"a word of {len(word.text):,} characters is longer than any key or value a node takes ({limit:,} bytes)"
            )
        words.append(word)


def _unquote(typed: str) -> str:
    return _PIECE.sub(_piece_text, typed)


def _piece_text(piece: re.Match[str]) -> str:
    bare, single, double, escaped = piece.groups()
    if double is not None:
        return _DOUBLE_QUOTED_ESCAPE.sub(r"\1", double) if "\\" in double else double
    return bare or single or escaped or ""


def quote(text: str) -> str:
    """``text`` as a word that :func:`split` gives back unchanged and never takes for shorthand."""
    if text and _UNSAFE.search(text) is None:
        return text
    return "'" + text.replace("'", "'\"'\"'") + "'"


def _unsplittable(line: str, pos: int) -> LineError:
    if line[pos] == "\\":
        return LineError("a \\ at the end of the line escapes nothing")
    return LineError(f"the {line[pos]} at column {pos + 1} is never closed")
