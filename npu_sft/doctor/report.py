"""The doctor's findings as a table that reads at 80 columns, and its verdict in one line."""

from __future__ import annotations

from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from npu_sft.doctor.models import Finding, worst

STYLES = {"ok": "green", "warning": "yellow", "error": "red"}


def render_findings(title: str, findings: list[Finding]) -> list[RenderableType]:
    table = Table(title=title, title_justify="left", show_lines=True)
    table.add_column("check", overflow="fold", max_width=18)
    table.add_column("", no_wrap=True)
    table.add_column("found / fix", overflow="fold", ratio=1)
    for finding in findings:
        said = Text(finding.detail)
        if finding.fix:
            said.append(f"\nfix: {finding.fix}", style="bold")
        table.add_row(finding.check, Text(finding.status, style=STYLES[finding.status]), said)
    errors = sum(finding.status == "error" for finding in findings)
    warnings = sum(finding.status == "warning" for finding in findings)
    verdict = {"ok": "ready", "warning": "ready, with warnings", "error": "not ready"}[worst(findings)]
    counted = f"{errors} error{'s' * (errors != 1)}, {warnings} warning{'s' * (warnings != 1)}"
    return [table, Text(f"{verdict}: {counted}", style=STYLES[worst(findings)])]
