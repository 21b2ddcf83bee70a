"""The map matches the house: docs/architecture.md names only files that exist, and every module
of the library and every entry script is on it (so a moved or added file fails here until the map
follows)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "architecture.md"
# A repository path in backticks or in the data-flow figure: a top-level folder, then a file.
PATH = re.compile(r"\b((?:sfd|train|eval|sample|pipeline|bench|tests|docs)/[\w./-]*\w)")
ENTRY_FOLDERS = ("train", "eval", "sample", "pipeline", "bench")


def named_paths() -> set[str]:
    return set(PATH.findall(DOC.read_text()))


def test_every_named_path_exists() -> None:
    missing = sorted(p for p in named_paths() if not (REPO / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_module_and_script_is_on_the_map() -> None:
    text = DOC.read_text()
    modules = [p for p in (REPO / "sfd").rglob("*.py") if p.name != "__init__.py"]
    scripts = [p for folder in ENTRY_FOLDERS for p in (REPO / folder).glob("*.py") if p.name != "__init__.py"]
    absent = []
    for p in modules + scripts:
        rel = p.relative_to(REPO).as_posix()
        # A module may be named by its path, or in its package's table by the part under sfd/.
        under_sfd = rel.removeprefix("sfd/")
        if rel not in text and f"`{under_sfd}`" not in text:
            absent.append(rel)
    assert not absent, f"docs/architecture.md does not mention: {sorted(absent)}"


def test_no_sentence_is_cut_off() -> None:
    # A prose line ending without punctuation followed by a list item or a blank line is a cut
    # sentence (the drift this test was written for).
    lines = DOC.read_text().splitlines()
    in_code = False
    bad = []
    for i, line in enumerate(lines):
        if line.startswith("```"):
            in_code = not in_code
            continue
        if in_code or not line.startswith("- "):
            continue
        # the last line of this list item
        j = i
        while j + 1 < len(lines) and lines[j + 1].startswith("  ") and lines[j + 1].strip():
            j += 1
        end = lines[j].rstrip()
        if end and end[-1] not in ".:;)`|*!?":
            bad.append(f"line {j + 1}: {end[-60:]}")
    assert not bad, "list items that end mid-sentence:\n" + "\n".join(bad)
