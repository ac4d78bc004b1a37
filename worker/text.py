"""The rule for text that enters echoq: control characters are refused, not removed.

Text is spoken by the replica, so a NUL, an escape sequence or a lone surrogate in it is a
mistake (or an attack on whatever displays the transcript), never something to say. Removing
such characters silently would speak something other than what was sent; refusing names the
character and where it is, so the sender can fix it. Ordinary whitespace — tab, line feed,
carriage return — is kept as it is.

Refused: the C0 and C1 control characters (U+0000–U+001F except tab, LF, CR; U+007F–U+009F) and
lone surrogates (U+D800–U+DFFF, which cannot be encoded as UTF-8 at all).
"""

from __future__ import annotations

import re

from .errors import InvalidInput

__all__ = ["ALLOWED_CONTROLS", "check_text", "text_problem"]

ALLOWED_CONTROLS = "\t\n\r"
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


def text_problem(text: str) -> str | None:
    """What breaks the rule in ``text`` (the first refused character and its index), or None."""
    match = _FORBIDDEN.search(text)
    if match is None:
        return None
    point = ord(match.group())
    if 0xD800 <= point <= 0xDFFF:  # how Python carries bytes that were not UTF-8 (argv, surrogateescape)
        return f"contains a lone surrogate U+{point:04X} at index {match.start()}: it is not valid Unicode (was it UTF-8?)"
    return (f"contains the control character U+{point:04X} at index {match.start()}; "
            "only tab, line feed and carriage return are allowed")


def check_text(text: str, what: str = "text") -> str:
    """``text`` unchanged when it follows the rule; :class:`InvalidInput` naming the character otherwise."""
    problem = text_problem(text)
    if problem is not None:
        raise InvalidInput(f"{what} {problem}")
    return text
