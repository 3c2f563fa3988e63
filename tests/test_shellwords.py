"""The shell's tokenizer: words, whether each was quoted, clear errors, and quoting back."""

from __future__ import annotations

import re
import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcache.shellwords import LineError, Word, quote, split


def bare(text: str) -> Word:
    return Word(text, False)


def quoted(text: str) -> Word:
    return Word(text, True)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("", []),
        ("  \t ", []),
        ("set k v", [bare("set"), bare("k"), bare("v")]),
        ("set  k\tv ", [bare("set"), bare("k"), bare("v")]),
        ("ttl=60", [bare("ttl=60")]),
        ("'ttl=60'", [quoted("ttl=60")]),
        ('"ttl=60"', [quoted("ttl=60")]),
        (r"ttl\=60", [quoted("ttl=60")]),
        ("tt'l'=60", [quoted("ttl=60")]),  # quoted anywhere: a value, never shorthand
        ("'two words'", [quoted("two words")]),
        ("a'b'\"c\"d", [quoted("abcd")]),
        ("''", [quoted("")]),
        ('""', [quoted("")]),
        ("k ''", [bare("k"), quoted("")]),
        (r'"a \"b\" \\ \$"', [quoted(r'a "b" \ \$')]),  # in "...", only \" and \\ are escapes
        (r"'a \"b'", [quoted(r"a \"b")]),  # in '...', nothing is
        (r"a\ b", [quoted("a b")]),
        ("k # a comment", [bare("k")]),
        ("# a comment", []),
        ("#'not a quote", []),
        ("k #'not a quote", [bare("k")]),
        ("user#1", [bare("user#1")]),  # a # inside a word is the word's, as in a shell
        ("'a'#b", [quoted("a#b")]),
        ('k "#1"', [bare("k"), quoted("#1")]),
        ("é\xa0x", [bare("é\xa0x")]),  # only space, tab, CR and LF part words
    ],
)
def test_words_and_whether_they_were_quoted(line: str, words: list[Word]) -> None:
    assert split(line) == words


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("get 'unclosed", "the ' at column 5 is never closed"),
        ('set k "a b', 'the " at column 7 is never closed'),
        ('set k "a\\"', 'the " at column 7 is never closed'),
        ("get k\\", "a \\ at the end of the line escapes nothing"),
    ],
)
def test_a_line_that_cannot_be_split_is_one_clear_error(line: str, message: str) -> None:
    with pytest.raises(LineError) as caught:
        split(line)
    assert str(caught.value) == message


def test_a_word_longer_than_anything_a_node_takes_is_refused() -> None:
    assert split("set k " + "v" * 100, max_word=100) == [bare("set"), bare("k"), bare("v" * 100)]
    with pytest.raises(LineError, match="a word of 101 characters is longer than any key or value a node takes"):
        split("set k " + "v" * 101 + " ttl=5", max_word=100)
    with pytest.raises(LineError, match="a word of 101 characters"):
        split("set k '" + "v" * 99 + "'\\ x", max_word=100)


@given(st.text(st.sampled_from(list("ab ='\"\\\t\n\r") + ["é", "\x0b", "\xa0"]), max_size=30))
def test_the_same_words_as_shlex(line: str) -> None:
    # No "#" here: shlex also ends a word at a # inside it, where a shell does not (see above).
    try:
        expected = shlex.split(line, comments=True)
    except ValueError:
        with pytest.raises(LineError):
            split(line)
        return
    assert [word.text for word in split(line)] == expected


@given(st.text(st.sampled_from(list("ab =#:\t\n\r")), max_size=30))
def test_words_with_nothing_quoted_are_bare(line: str) -> None:
    typed = [word for word in re.split("[ \t\r\n]+", line) if word]
    typed = typed[: next((i for i, word in enumerate(typed) if word.startswith("#")), len(typed))]
    assert split(line) == [bare(word) for word in typed]


@given(st.text())
def test_quote_gives_back_the_text_never_as_shorthand(text: str) -> None:
    [word] = split(quote(text))
    assert word.text == text and (word.quoted or "=" not in text)
    assert shlex.split(quote(text)) == [text]


def test_quote_leaves_plain_keys_bare() -> None:
    assert quote("user:1001") == "user:1001"
    assert quote("ns=x") == "'ns=x'"
    assert quote("it's") == "'it'\"'\"'s'"
