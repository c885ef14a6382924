"""How a token string is shown to a person: whitespace and invisible characters made visible.

Token strings are model data, and hostile ones exist (`<script>`, RTL overrides, NUL bytes).
This only makes them visible; HTML escaping is the template engine's job (autoescape)."""

from __future__ import annotations

import functools
import unicodedata

LABEL_TOKENS = 3  # a channel's short label: its first top tokens
_WHITESPACE = {" ": "\u00b7", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
_IN_RUNNING_TEXT = {" ": " ", "\n": "\u23ce", "\t": "\u21e5", "\r": ""}  # a context reads as prose


@functools.lru_cache(maxsize=65536)  # the same tokens recur on every page
def visible(token: str, running: bool = False) -> str:
    """A middle dot for each space, \\n and \\t for newlines and tabs, and \\uXXXX escapes for
    control, format (zero-width, bidi overrides), separator and unassigned characters."""
    whitespace = _IN_RUNNING_TEXT if running else _WHITESPACE
    out = []
    for ch in token:
        if ch in whitespace:
            out.append(whitespace[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"):
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out) or "\u2205"  # the empty token


def label(tokens: list[str]) -> str:
    """A channel's short label in lists, links and search hits: its first LABEL_TOKENS tokens."""
    return " / ".join(visible(token) for token in tokens[:LABEL_TOKENS]) or "(no tokens)"


def in_text(token: str) -> str:
    """A token inside a context that reads as text: spaces stay spaces, a newline is a return
    sign; invisible characters are escaped as in `visible`."""
    return visible(token, running=True)
