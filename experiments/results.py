"""experiments/RESULTS.md: one section per measuring script, between `<!-- key -->` and `<!-- /key -->`.

Each script rewrites only its own section (or appends it), atomically, so a reader never sees half a file and
the other scripts' sections are left as they were."""

from __future__ import annotations

import re
from pathlib import Path

from inversion.embedding import atomic_write

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = "# Results\n\n"


def markers(key: str) -> tuple[str, str]:
    """The opening and closing comments of a section."""
    return f"<!-- {key} -->", f"<!-- /{key} -->"


def _pattern(key: str) -> re.Pattern:
    begin, end = markers(key)
    return re.compile(rf"{re.escape(begin)}\n?(.*?)\n?{re.escape(end)}", re.S)


def read_section(path: Path, key: str) -> str | None:
    """The section's text between its markers (markers excluded), or None when the file or section is absent."""
    path = Path(path)
    found = _pattern(key).search(path.read_text()) if path.is_file() else None
    return None if found is None else found.group(1).strip("\n")


def write_section(path: Path, key: str, body: str) -> Path:
    """Replace the `key` section with `body` (markers added), or append it; the rest of the file is kept."""
    path = Path(path)
    begin, end = markers(key)
    block = begin + "\n" + body.strip("\n") + "\n" + end
    text = path.read_text() if path.is_file() else HEADER
    text, found = _pattern(key).subn(lambda _: block, text, count=1)
    if not found:
        text = text.rstrip("\n") + "\n\n" + block
    return atomic_write(path, lambda f: f.write((text.rstrip("\n") + "\n").encode()))
