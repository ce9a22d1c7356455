"""A health check's finding (:class:`Finding`), and telling them: one line each, with its fix;
under ``--strict`` warnings become errors (docs/design.md, "Health checks")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tive.errors import TiveError

WARNING, NOTE = "warning", "note"


class HealthError(TiveError):
    """``--strict`` and a health check found something."""


@dataclass(frozen=True)
class Finding:
    """One thing a health check found.

    Attributes:
        check: what was checked (``reference``, ``features``, ``collapse``, ``coverage``,
            ``projection``, ``task-value``, ``quota``, ``tasks``, ``data``).
        message: what was found and where.
        fix: what to do about it.
        level: ``warning`` (a problem; an error under ``--strict``) or ``note`` (a check that
            could not be made, or a condition asked for).
    """

    check: str
    message: str
    fix: str
    level: str = WARNING

    def line(self, strict: bool = False) -> str:
        """The finding as one line: ``warning: CHECK: MESSAGE; fix: FIX`` (``error:`` for a
        warning under ``strict``)."""
        level = "error" if strict and self.level == WARNING else self.level
        return f"{level}: {self.check}: {self.message}; fix: {self.fix}"


def warnings_in(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that are problems (not notes)."""
    return [f for f in findings if f.level == WARNING]


def tell(findings: Sequence[Finding], echo: Callable[[str], None], strict: bool = False) -> None:
    """Echo each finding as one line; under ``strict`` raise if any is a warning.

    Raises:
        HealthError: ``strict`` and at least one warning (after every line is told).
    """
    for finding in findings:
        echo(finding.line(strict))
    problems = warnings_in(findings)
    if strict and problems:
        raise HealthError(f"{len(problems)} health check{'s' if len(problems) > 1 else ''} "
                          f"failed (--strict; each is told above with its fix); fix: act on "
                          f"them, or leave out --strict to go on with warnings")
