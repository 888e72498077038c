"""Evaluate routing rules (``config.routing``) on instance headers: the first rule whose conditions
all hold decides an instance.

At selection time every instance of a study is matched: instances a ``skip`` rule matches are
left out with that rule's reason; the others go to the frontal selector (``dicom_node.selector``),
and the rule that matched the chosen instance is the study's rule (its tasks and destinations are
used by the worker). The study's routing (rule index, name, action, tasks, destinations, why) is
recorded in the job store.

Reasons name attributes and operators, never the instance's values (they may be patient data;
``dicom_node.phi``): "PatientAge within [18, -]", "ViewPosition missing".
"""

from __future__ import annotations

import contextvars
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from config.routing import RoutingRule, RuleCondition
from config.settings import InferenceSettings

NO_RULE = "(no rule)"
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$", re.I)
_AGE_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


class RuleValueError(ValueError):
    """An attribute a rule reads cannot be interpreted (named; the value is never shown)."""


@dataclass(frozen=True)
class RuleMatch:
    """Which rule decided one instance (``index`` is None when no rule matched) and why."""

    index: int | None
    name: str
    action: str  # infer | skip | forward | none
    why: tuple[str, ...]
    tasks: tuple[str, ...] | None = None
    destinations: tuple[str, ...] | None = None
    reason: str | None = None
    not_matched: tuple[str, ...] = field(default=())  # "rules[0] 'er-only': CallingAETitle not one of …"

    @property
    def label(self) -> str:
        return NO_RULE if self.index is None else f"rules[{self.index}] {self.name!r}"

    def explain(self) -> str:
        if self.index is None:
            return "no rule matched: " + "; ".join(self.not_matched)
        because = "; ".join(self.why) or "no conditions (matches every instance)"
        return f"{self.label} → {self.action}: {because}"

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("not_matched")
        return json.dumps(data)


def _raw(ds: Dataset, keyword: str, calling_ae: str | None) -> object:
    if keyword == "CallingAETitle":
        return calling_ae
    try:
        element = ds.get(keyword)
    except Exception as exc:
        raise RuleValueError(f"{keyword} cannot be read ({type(exc).__name__})") from exc
    return element


def _strings(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, DicomSequence):
        return ["(sequence)"] if len(value) else []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return [str(v).strip() for v in value if str(v).strip()]
    text = str(value).strip()
    return [text] if text else []


def _number(keyword: str, text: str) -> float:
    if keyword == "PatientAge" or _AGE.match(text):
        match = _AGE.match(text)
        if match is None:
            raise RuleValueError(f"{keyword} is not a DICOM age string (nnnD/W/M/Y)")
        return int(match.group(1)) * _AGE_YEARS[match.group(2).upper()]
    try:
        return float(text)
    except ValueError as exc:
        raise RuleValueError(f"{keyword} is not a number") from exc


def check(condition: RuleCondition, ds: Dataset, calling_ae: str | None) -> tuple[bool, str]:
    """(holds, why) for one condition; ``why`` names the attribute and the test, never the value."""
    keyword = condition.attribute
    values = _strings(_raw(ds, keyword, calling_ae))
    if condition.present is not None:
        held = bool(values) == condition.present
        return held, f"{keyword} {'present' if values else 'missing'}"
    if not values:
        return False, f"{keyword} missing"
    if condition.equals is not None:
        held = any(v.upper() == condition.equals.strip().upper() for v in values)
        return held, f"{keyword} {'equals' if held else 'differs from'} {condition.equals!r}"
    if condition.in_ is not None:
        wanted = {w.strip().upper() for w in condition.in_}
        held = any(v.upper() in wanted for v in values)
        return held, f"{keyword} {'is' if held else 'is not'} one of {sorted(condition.in_)}"
    if condition.not_in is not None:
        unwanted = {w.strip().upper() for w in condition.not_in}
        held = not any(v.upper() in unwanted for v in values)
        return held, f"{keyword} {'is not' if held else 'is'} one of {sorted(condition.not_in)}"
    if condition.matches is not None:
        pattern = re.compile(condition.matches, re.I)
        held = any(pattern.search(v) for v in values)
        return held, f"{keyword} {'matches' if held else 'does not match'} /{condition.matches}/"
    number = _number(keyword, values[0])
    low = "-" if condition.min is None else f"{condition.min:g}"
    high = "-" if condition.max is None else f"{condition.max:g}"
    held = (condition.min is None or number >= condition.min) and (condition.max is None or number <= condition.max)
    unit = " (years)" if keyword == "PatientAge" else ""
    return held, f"{keyword}{unit} {'within' if held else 'outside'} [{low}, {high}]"


def match(rules: Sequence[RoutingRule], ds: Dataset, calling_ae: str | None = None) -> RuleMatch:
    """The first rule whose conditions all hold for this instance. An attribute that cannot be
    interpreted makes that rule not match (the reason says which attribute)."""
    not_matched: list[str] = []
    for index, rule in enumerate(rules):
        why: list[str] = []
        failed: str | None = None
        for condition in rule.when:
            try:
                held, reason = check(condition, ds, calling_ae)
            except RuleValueError as exc:
                held, reason = False, str(exc)
            if not held:
                failed = reason
                break
            why.append(reason)
        if failed is None:
            return RuleMatch(index, rule.name, rule.action, tuple(why),
                             tuple(rule.tasks) if rule.tasks is not None else None,
                             tuple(rule.destinations) if rule.destinations is not None else None,
                             rule.reason, tuple(not_matched))
        not_matched.append(f"rules[{index}] {rule.name!r}: {failed}")
    return RuleMatch(None, NO_RULE, "none", (), None, None, "no routing rule matched", tuple(not_matched))


def match_file(rules: Sequence[RoutingRule], path: Path, calling_ae: str | None = None) -> RuleMatch:
    from dicom_node.selector import read_header

    return match(rules, read_header(path), calling_ae)


# ---- the study's tasks, seen by the analyzer ----------------------------------------------------
_STUDY_TASKS: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("radvlm_study_tasks",
                                                                                        default=None)


@contextmanager
def study_tasks(tasks: Sequence[str] | None) -> Iterator[None]:
    """While the worker analyses a study, the tasks its routing rule asked for (None: configured)."""
    token = _STUDY_TASKS.set(tuple(tasks) if tasks is not None else None)
    try:
        yield
    finally:
        _STUDY_TASKS.reset(token)


def inference_for_study(inference: InferenceSettings) -> InferenceSettings:
    """``inference`` with the current study's rule tasks (unchanged outside ``study_tasks``)."""
    tasks = _STUDY_TASKS.get()
    if tasks is None or list(tasks) == list(inference.tasks):
        return inference
    return inference.model_copy(update={"tasks": list(tasks)})


# ---- `radvlm rules test` -----------------------------------------------------------------------
@dataclass(frozen=True)
class FileVerdict:
    """What the node would do with one file: the rule that matches, why, and (infer) the selector's view."""

    path: str
    match: RuleMatch | None
    selector: str | None = None  # infer: the frontal selector's decision and reason for this instance
    error: str | None = None

    def lines(self) -> list[str]:
        if self.match is None:
            return [f"{self.path}: cannot be read: {self.error}"]
        m = self.match
        out = [f"{self.path}: {m.explain()}"]
        if m.action == "infer":
            out.append(f"  tasks: {', '.join(m.tasks) if m.tasks is not None else 'the [inference] tasks'};"
                       f" destinations: {', '.join(m.destinations) if m.destinations is not None else 'all'}")
            if self.selector:
                out.append(f"  selector: {self.selector}")
        elif m.action == "skip":
            out.append(f"  skipped with reason: {m.reason}")
        elif m.action == "forward":
            out.append(f"  forwarded without inference to: {', '.join(m.destinations or ())}")
        out.extend(f"  not matched: {line}" for line in m.not_matched)
        return out

    def as_dict(self) -> dict[str, object]:
        if self.match is None:
            return {"path": self.path, "error": self.error}
        m = self.match
        return {"path": self.path, "rule_index": m.index, "rule": m.name, "action": m.action, "why": list(m.why),
                "tasks": m.tasks, "destinations": m.destinations, "reason": m.reason,
                "not_matched": list(m.not_matched), "selector": self.selector}


def explain_files(rules: Sequence[RoutingRule], paths: Sequence[Path], calling_ae: str | None = None) -> list[FileVerdict]:
    """Match every file as the node would (``calling_ae``: the sender to assume for CallingAETitle)."""
    from dicom_node.selector import Candidate, classify, read_header

    verdicts = []
    for path in paths:
        try:
            header = read_header(Path(path))
        except Exception as exc:
            verdicts.append(FileVerdict(str(path), None, error=f"{type(exc).__name__} (not a readable DICOM file)"))
            continue
        routed = match(rules, header, calling_ae)
        selector = None
        if routed.action == "infer":
            decided = classify(Candidate(str(getattr(header, "SOPInstanceUID", "")), header))
            selector = f"{decided.decision}: {decided.reason}"
        verdicts.append(FileVerdict(str(path), routed, selector))
    return verdicts


# ---- HTTP: /api/rules (bearer [api] token) -------------------------------------------------------
def rules_router(api_settings: object, current: Callable[[], Sequence[RoutingRule]],
                 reload: Callable[[], Sequence[RoutingRule]]) -> object:
    """``GET /api/rules``: the rules in force; ``POST /api/rules/reload``: re-read the configuration
    file and put its rules in force (as SIGHUP does); 400 with the error naming the rule and field
    when the file is invalid (the rules in force stay), 503 when this node has no file to re-read."""
    from fastapi import APIRouter, Depends

    from config import ConfigError
    from inference.api import ApiError, bearer_auth

    router = APIRouter(prefix="/api/rules", dependencies=[Depends(bearer_auth(api_settings))])

    def _listed(rules: Sequence[RoutingRule]) -> dict[str, object]:
        return {"rules": [{"index": i, **r.model_dump(by_alias=True, exclude_none=True)} for i, r in enumerate(rules)]}

    @router.get("")
    def rules_in_force() -> dict[str, object]:
        return _listed(current())

    @router.post("/reload")
    def reload_rules() -> dict[str, object]:
        try:
            rules = reload()
        except ConfigError as exc:
            raise ApiError(400, f"rules not reloaded, the rules in force stay: {exc}", code="invalid_rules") from None
        except ReloadUnavailableError as exc:
            raise ApiError(503, str(exc), type_="service_unavailable", code="reload_unavailable") from None
        return {"reloaded": True, **_listed(rules)}

    return router


class ReloadUnavailableError(RuntimeError):
    """The node was started without a configuration file loader (in-process, tests): nothing to re-read."""
