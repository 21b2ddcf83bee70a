"""The repository stands on its own: nothing in it reads or cites a path outside it, and every
citation of the method notes or a docs page resolves inside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".toml", ".txt", ".cfg", ".yaml", ".yml", ".sh", ""}
# Paths of the development machine's reference shelf and checkout, which a clone does not have
# (assembled from pieces so that this guard's own source does not match it).
_SHELF = "sha" + "red"
OUTSIDE = re.compile("|".join([
    r"\.\./" + _SHELF, "SFD_" + _SHELF.upper(), _SHELF + "/reference", _SHELF + "/data",
    r"\bDESIGN\.md", r"\bSTYLE\.md", "/" + "work" + "/",
]))
CITATION = re.compile(r"method\.md\s+§\s*(\d+(?:\.\d+)*)")


def tracked_text_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:  # not a git checkout (CI's copy, an unpacked archive): the source tree
        skip = {"runs", "data", "weights", "build", "dist"}  # outputs and inputs, not source
        files = [p for p in REPO.rglob("*") if p.is_file()
                 and not any(part.startswith(".") or part in skip or part.endswith(".egg-info")
                             for part in p.relative_to(REPO).parts[:-1])]
    else:
        files = [REPO / line for line in out.stdout.splitlines()]
    keep = []
    for p in files:
        if p.suffix in TEXT_SUFFIXES and p.is_file() and "tests/data" not in p.as_posix():
            keep.append(p)
    return keep


def method_sections() -> set[str]:
    heads = re.findall(r"^#+\s+(\d+(?:\.\d+)*)\.?\s", (REPO / "docs" / "method.md").read_text(), flags=re.M)
    return set(heads)


def test_nothing_cites_a_path_outside_the_repository() -> None:
    hits = []
    for p in tracked_text_files():
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{p.relative_to(REPO)}:{i}: {line.strip()[:120]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_every_method_citation_resolves() -> None:
    sections = method_sections()
    assert {"2.4", "4.2", "7.1", "12.3"} <= sections
    bad = []
    for p in tracked_text_files():
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for num in CITATION.findall(line):
                if num.rstrip(".") not in sections:
                    bad.append(f"{p.relative_to(REPO)}:{i}: §{num}")
    assert not bad, "citations of docs/method.md sections that do not exist:\n" + "\n".join(bad)


def test_relative_links_in_docs_resolve() -> None:
    bad = []
    for md in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", md.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (md.parent / target).exists():
                bad.append(f"{md.relative_to(REPO)} -> {target}")
    assert not bad, "broken relative links:\n" + "\n".join(bad)
