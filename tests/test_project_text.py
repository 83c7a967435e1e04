"""Project text speaks of the project: no words about how the work was organised, no overlong code lines.

Prose a user reads (README, docs, docstrings, comments) should describe the current state of the toolkit; the
history of how it got there belongs in git. These tests scan every tracked text file for words that only mean
something to the people who wrote it (tracker numbers, names of work periods, dated run logs, a design file users do not
have), and every line of the installed code for the 120-character limit.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = (".py", ".md", ".toml", ".txt")
CODE_ROOTS = ("flowaudit/", "adapters/", "reference_models/")
MAX_LINE = 120

# Each pattern is written so that its own source text does not match it (``\s+`` where the words have a space).
PROCESS_WORDS = {
    "tracker number": re.compile(r"\bissues?\s+#?\d+", re.IGNORECASE),
    "period end": re.compile(r"\b(this|last|previous|latest|next|earlier)\s+stops?\b", re.IGNORECASE),
    "period name": re.compile(
        r"\b(this|that|last|previous|next|earlier|a|one|each|every|my|our)\s+(work\s+)?sessions?\b"
        r"(?!\s*(object|cookie|token))",
        re.IGNORECASE,
    ),
    "run log": re.compile(r"\bruns\s+\d+\s*(–|-|;|and)\s*\d+\b", re.IGNORECASE),
    "dated log": re.compile(r"\b20\d\d-[01]\d-[0-3]\d\s+\d\d:\d\d\b"),
    "design file": re.compile(r"\bDESIGN(\s*\.\s*md\b|\s+§)"),
}


def _tracked_files() -> list[str]:
    """Tracked files, or every file under the root when this is not a git checkout (an unpacked sdist)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
        files = [f for f in out.split("\0") if f]
    except (OSError, subprocess.SubprocessError):
        files = []
    if not files:
        skip = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache"}
        files = [
            p.relative_to(ROOT).as_posix()
            for p in ROOT.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(ROOT).parts)
        ]
    return sorted(f for f in files if (ROOT / f).is_file())


def _text_files() -> list[str]:
    """Tracked text files but fixtures and this file, whose examples below are the words it looks for."""
    this = Path(__file__).resolve().relative_to(ROOT).as_posix()
    return [
        f for f in _tracked_files() if f.endswith(TEXT_SUFFIXES) and not f.startswith("tests/fixtures/") and f != this
    ]


def _offences(files: list[str], check) -> list[str]:
    found = []
    for name in files:
        text = (ROOT / name).read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            why = check(line)
            if why:
                found.append(f"{name}:{number}: {why}: {line.strip()[:100]}")
    return found


def _process_word(line: str) -> str | None:
    for label, pattern in PROCESS_WORDS.items():
        hit = pattern.search(line)
        if hit:
            return f"{label} {hit.group(0)!r}"
    return None


def _words(*parts: str, sep: str = " ") -> str:
    """An example line joined at run time, so that this file's own text holds none of the words it looks for."""
    return sep.join(parts)


@pytest.mark.parametrize(
    "line, label",
    [
        (_words("goal (issue", "12): audited <= 1.05"), "tracker number"),
        (_words("Issues", "10 and 11"), "tracker number"),
        (_words("the figures of this", "stop"), "period end"),
        (_words("1.03 at the last", "stop"), "period end"),
        (_words("what the previous ses", "sion measured", sep=""), "period name"),
        ("runs 29–33 of the exact rows", "run log"),
        ("runs 29; 30", "run log"),
        ("Latest figures, 2026-12-04 03:53 UTC", "dated log"),
        ("see DESIGN.md §4", "design file"),
        ("leaves nothing behind (DESIGN §5)", "design file"),
    ],
)
def test_process_word_patterns_catch_what_they_are_for(line: str, label: str) -> None:
    why = _process_word(line)
    assert why is not None and why.startswith(label), (line, why)


@pytest.mark.parametrize(
    "line",
    [
        "the stop flag is set by SIGTERM",
        _words("a requests.Ses", "sion object", sep=""),
        "--runs 2 repeats the whole table",
        _words("a real fuzzing ses", "sion", sep=""),
        "Remark 2 of Hong et al. 2023",
    ],
)
def test_process_word_patterns_leave_ordinary_words_alone(line: str) -> None:
    assert _process_word(line) is None, line


def test_project_text_has_no_process_words() -> None:
    found = _offences(_text_files(), _process_word)
    assert not found, "words about how the work was organised:\n" + "\n".join(found)


def test_code_lines_fit_in_120_characters() -> None:
    code = [f for f in _tracked_files() if f.endswith(".py") and f.startswith(CODE_ROOTS)]
    assert code, "no code files found"

    def too_long(line: str) -> str | None:
        return f"{len(line)} characters" if len(line) > MAX_LINE else None

    found = _offences(code, too_long)
    assert not found, f"lines over {MAX_LINE} characters:\n" + "\n".join(found)
