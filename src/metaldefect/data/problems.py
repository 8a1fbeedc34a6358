"""Collecting data problems: report and skip, or (strict) stop at the first one.

Readers never raise on a bad file in lenient mode: they add a one-line problem naming
the file and carry on, so the rest of the dataset still loads. With ``strict=True``
the first problem raises :class:`DataError` instead.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from metaldefect.errors import DataError


@dataclass(frozen=True)
class Problem:
    file: str
    message: str
    kind: str = "error"  # "error": the object/file was dropped; "fixed": repaired and kept

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class ProblemLog:
    """An ordered list of problems found while reading or converting data."""

    strict: bool = False
    problems: list[Problem] = field(default_factory=list)

    def add(self, file: str | Path, message: str, kind: str = "error") -> None:
        problem = Problem(str(file), message, kind)
        if self.strict:
            raise DataError(str(problem))
        self.problems.append(problem)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self):
        return iter(self.problems)

    def print(self, stream=None, limit: int | None = None) -> None:
        """Print one line per problem (the first ``limit`` of them, then a count) to ``stream`` (stderr)."""
        stream = stream or sys.stderr  # looked up at call time, so redirected stderr is honoured
        shown = self.problems if limit is None else self.problems[:limit]
        for problem in shown:
            print(f"warning: {problem}", file=stream)
        if limit is not None and len(self.problems) > limit:
            print(f"warning: ... and {len(self.problems) - limit} more problems", file=stream)
