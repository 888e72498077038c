"""Routing rules: which studies go to the model, with which tasks, and where results go.

An ordered list in ``[[rules]]``; the first rule whose conditions all hold decides an instance
(``dicom_node.rules`` evaluates them, docs/operations.md "Rules" has worked examples). The default
list is one catch-all ``infer`` rule: today's behaviour (the frontal selector decides, every task,
every destination).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TaskLiteral = Literal["report", "classification", "grounding"]
PSEUDO_ATTRIBUTES = {"CallingAETitle": "the calling AE title of the association that sent the instance"}
NUMERIC_VRS = {"AS", "DS", "IS", "US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"}


class _RuleSection(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class RuleCondition(_RuleSection):
    """One test of one attribute; exactly one operator. Attributes are DICOM keywords of the
    instance's top-level header (``Modality``, ``BodyPartExamined``, ``PatientAge``…) or
    ``CallingAETitle``. Text compares after stripping spaces; ``equals``/``in`` ignore case."""

    attribute: str = Field(description="DICOM keyword (e.g. ViewPosition) or CallingAETitle")
    equals: str | None = Field(default=None, description="value equals (case-insensitive)")
    in_: list[str] | None = Field(default=None, alias="in", description="value is one of (case-insensitive)")
    not_in: list[str] | None = Field(default=None, description="value is present and none of these")
    matches: str | None = Field(default=None, description="Python regular expression searched in the value"
                                " (case-insensitive)")
    min: float | None = Field(default=None, description="numeric value ≥ min (PatientAge: in years)")
    max: float | None = Field(default=None, description="numeric value ≤ max (PatientAge: in years)")
    present: bool | None = Field(default=None, description="true: attribute present and not empty; false: missing"
                                 " or empty")

    def operators(self) -> list[str]:
        names = [("equals", self.equals), ("in", self.in_), ("not_in", self.not_in), ("matches", self.matches),
                 ("present", self.present)]
        used = [name for name, value in names if value is not None]
        if self.min is not None or self.max is not None:
            used.append("range")
        return used

    def problem(self) -> str | None:
        """Why this condition is unusable (None when it is fine); names fields, never header values."""
        from pydicom.datadict import dictionary_VR, tag_for_keyword  # here: `radvlm --help` stays fast

        keyword = self.attribute
        if keyword not in PSEUDO_ATTRIBUTES and tag_for_keyword(keyword) is None:
            return f"attribute {keyword!r} is not a DICOM keyword (e.g. Modality, ViewPosition) nor CallingAETitle"
        used = self.operators()
        if len(used) != 1:
            return (f"needs exactly one of equals, in, not_in, matches, min/max, present (has "
                    f"{', '.join(used) or 'none'})")
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as exc:
                return f"matches: invalid regular expression ({exc})"
        if used == ["range"]:
            if keyword in PSEUDO_ATTRIBUTES or dictionary_VR(keyword) not in NUMERIC_VRS:
                return f"min/max need a numeric attribute (age string or number); {keyword} is not one"
            if self.min is not None and self.max is not None and self.min > self.max:
                return f"min ({self.min:g}) is above max ({self.max:g})"
        if self.in_ is not None and not self.in_:
            return "in: empty list (would never match)"
        return None


class RoutingRule(_RuleSection):
    """All conditions in ``when`` must hold (an empty ``when`` matches everything)."""

    name: str = Field(min_length=1, max_length=64, description="shown in `radvlm jobs`, logs and the audit trail")
    when: list[RuleCondition] = Field(default=[], description="all must hold; empty = always")
    action: Literal["infer", "skip", "forward"]
    tasks: list[TaskLiteral] | None = Field(
        default=None, description="infer: the tasks to run; default [inference] tasks")
    reason: str | None = Field(default=None, max_length=200, description="skip: recorded as the study's reason")
    destinations: list[str] | None = Field(
        default=None, description="infer: destination names results go to (default: every configured"
        " destination); forward: required, the destinations that receive the source instances")

    @model_validator(mode="after")
    def _consistent(self) -> "RoutingRule":
        problems = []
        for index, condition in enumerate(self.when):
            problem = condition.problem()
            if problem:
                problems.append(f"when[{index}] ({condition.attribute}): {problem}")
        if self.action == "skip" and not self.reason:
            problems.append("action 'skip' needs a reason (recorded with every skipped study)")
        if self.action != "infer" and self.tasks is not None:
            problems.append(f"tasks: only an 'infer' rule runs tasks (action is {self.action!r})")
        if self.action == "infer" and self.tasks is not None and not self.tasks:
            problems.append("tasks: empty list (use action 'skip' to run nothing)")
        if self.action == "skip" and self.destinations is not None:
            problems.append("destinations: a 'skip' rule sends nothing")
        if self.action == "forward" and not self.destinations:
            problems.append("action 'forward' needs destinations (names of dicom, dicomweb or folder"
                            " [[destinations]] that receive the source instances)")
        if problems:
            raise ValueError(f"rule {self.name!r}: " + "; ".join(problems))
        return self


def default_rules() -> list[RoutingRule]:
    """Today's behaviour: every instance goes to the frontal selector, every task, every destination."""
    return [RoutingRule(name="default", action="infer")]
