"""Error types shared by every part of adapterhub.

`AdapterhubError` marks a *user* error: bad input that the caller can fix. The CLI turns it
into one line and exit code 1, the server into OpenAI's error JSON. Anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from collections.abc import Iterable


class AdapterhubError(Exception):
    """Bad input or a state the user can fix; the message says what and where."""


class ValidationError(AdapterhubError):
    """Every problem found in one input, reported at once (not one per attempt)."""

    def __init__(self, subject: str, problems: Iterable[str]) -> None:
        self.subject = subject
        self.problems = list(problems)
        if not self.problems:
            raise ValueError("ValidationError needs at least one problem")
        if len(self.problems) == 1:
            message = f"{subject}: {self.problems[0]}"
        else:
            listed = "; ".join(f"({i}) {p}" for i, p in enumerate(self.problems, 1))
            message = f"{subject}: {len(self.problems)} problems: {listed}"
        super().__init__(message)


class NotFoundError(AdapterhubError):
    """A reference (adapter, base model, file) that matches nothing."""


class AmbiguousRefError(AdapterhubError):
    """A reference that matches more than one record."""


class CorruptBlobError(AdapterhubError):
    """Stored content whose hash no longer matches its address."""
