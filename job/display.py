"""Text that models and data sets wrote, made safe to show: on a terminal (`peftopt inspect`), and as one cell of the
report's Markdown and HTML (`peftopt report`). Such text may hold terminal escapes (clipboard writes, hyperlinks,
line overwrites), line breaks other programs split on (\\r, U+2028, U+0085: a new Markdown line that becomes an
`<img>` beacon or a heading), and bidirectional overrides that make text read other than it is.
"""
from __future__ import annotations

import re

# What str.splitlines and Markdown renderers take for the end of a line
LINE_BREAKS = re.compile("\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
# C0 and C1 controls (ESC among them), DEL, and the bidirectional embedding, override and isolate characters
UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u2028\u2029]")


def _escaped(match: re.Match) -> str:
    char = match.group(0)
    return f"\\x{ord(char):02x}" if ord(char) < 0x100 else f"\\u{ord(char):04x}"


def for_terminal(text: str) -> str:
    """`text` with every control character but newline and tab shown as an escape (`\\x1b`), never interpreted."""
    return UNSAFE.sub(_escaped, text.replace("\r\n", "\n"))


def table_cell(text: str, limit: int | None = None) -> str:
    """`text` as one cell of a Markdown table: line breaks of every kind as <br>, pipes escaped, other controls
    shown as escapes; cut to `limit` characters first."""
    text = text[:limit] if limit else text
    return for_terminal(LINE_BREAKS.sub("<br>", text)).replace("|", "\\|")


def one_line(text: str) -> str:
    """`text` on one line (a Markdown heading): line breaks as spaces, controls as escapes."""
    return for_terminal(LINE_BREAKS.sub(" ", text))
