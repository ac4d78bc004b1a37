"""The text rule: control characters and lone surrogates refused, ordinary whitespace kept."""

from __future__ import annotations

import re

import pytest

from worker.errors import InvalidInput
from worker.text import check_text, text_problem


@pytest.mark.parametrize("text", ["Hello there!", "tab\there", "two\nlines\r\n", "emoji 🎉 and ü", "\u2028 separator"])
def test_ordinary_text_passes_unchanged(text: str) -> None:
    assert check_text(text) is text and text_problem(text) is None


@pytest.mark.parametrize(("text", "point", "index"), [
    ("a\x00b", "U+0000", 1), ("\x1b[31m", "U+001B", 0), ("x\x0b", "U+000B", 1), ("\x0c", "U+000C", 0),
    ("ok\x7f", "U+007F", 2), ("one\x85two", "U+0085", 3), ("\x9f", "U+009F", 0),
])
def test_control_characters_are_refused_by_code_point_and_index(text: str, point: str, index: int) -> None:
    with pytest.raises(InvalidInput, match=re.escape(f"text contains the control character {point} at index {index}")):
        check_text(text)


def test_a_lone_surrogate_is_refused_as_not_unicode() -> None:
    with pytest.raises(InvalidInput, match="lone surrogate U\\+DCE9 at index 3"):
        check_text(b"caf\xe9".decode("utf-8", "surrogateescape"))
    assert check_text("pair \U0001f600") == "pair \U0001f600"  # a real pair is one code point
