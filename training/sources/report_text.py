"""Findings text from a free-text radiology report.

MIMIC-CXR reports (``files/p10/p10000032/s50414267.txt`` in ``mimic-cxr-reports.zip``) are free
text with upper-case section headers ("EXAMINATION:", "INDICATION:", "FINDINGS:",
"IMPRESSION:" …). Upstream RadVLM used the sections that MIT-LCP's ``create_section_files.py``
writes to ``reports.csv`` (columns ``study``, ``findings``, ``impression``, ``last_paragraph``)
and took, in this order, the findings, else the impression, else the last paragraph, with line
breaks removed (``MIMIC_Dataset_MM.__getitem__``). `report_sections` splits a report the same
way so the raw report files give the same text; site reports go through the same rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z &/()-]{2,40}):[ \t]*", re.MULTILINE)


@dataclass(frozen=True)
class ReportSections:
    findings: str
    impression: str
    last_paragraph: str


def _clean(text: str) -> str:
    return " ".join(text.split())


def report_sections(report: str) -> ReportSections:
    """FINDINGS, IMPRESSION and the last paragraph of a report (each whitespace-normalised,
    empty when absent). A header is an upper-case phrase and a colon at the start of a line."""
    sections: dict[str, str] = {}
    headers = list(_HEADER.finditer(report))
    for index, match in enumerate(headers):
        end = headers[index + 1].start() if index + 1 < len(headers) else len(report)
        name = " ".join(match.group(1).split())
        sections.setdefault(name, _clean(report[match.end():end]))
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", report) if p.strip()]
    last = _clean(_HEADER.sub("", paragraphs[-1])) if paragraphs else ""
    findings = sections.get("FINDINGS", "") or sections.get("FINDINGS AND IMPRESSION", "")
    return ReportSections(findings=findings, impression=sections.get("IMPRESSION", ""),
                          last_paragraph=last)


def findings_text(report: str) -> str:
    """Upstream's choice: findings, else impression, else last paragraph ("" when none)."""
    sections = report_sections(report)
    return sections.findings or sections.impression or sections.last_paragraph


def pick_sections(findings: str | None, impression: str | None,
                  last_paragraph: str | None) -> str:
    """The same choice over already-split sections (``reports.csv``)."""
    for part in (findings, impression, last_paragraph):
        if part and part.strip() and part.strip() != "0":
            return _clean(part)
    return ""
