"""Timings and slot maths (pure): when a schedule fires, and which slot a firing stands for.

Three kinds, all timezone-aware (``tz``, an IANA name, default UTC): ``cron`` (five fields,
evaluated in ``tz`` with croniter), ``every`` (whole seconds on a grid anchored when the timing
was set) and ``at`` (one date-time). :func:`trigger` builds the RedBeat schedule that publishes a
timing's firings; how a firing becomes a run is :mod:`producer.scripting.schedules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from celery import Celery
from celery.schedules import crontab
from celery.schedules import schedule as interval_schedule
from croniter import croniter

from worker.errors import InvalidInput

from .script import parse_duration

__all__ = ["Timing", "parse_timing", "slot_id", "parse_slot_id", "latest_slot", "next_slot", "is_slot", "trigger"]


@dataclass(frozen=True)
class Timing:
    """When a schedule fires: exactly one of ``cron``, ``every_s``, ``at``; ``tz`` an IANA name."""

    cron: str | None = None
    every_s: int | None = None
    at: datetime | None = None
    tz: str = "UTC"

    @property
    def kind(self) -> str:
        return "cron" if self.cron else "every" if self.every_s else "at"

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.tz)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "tz": self.tz}
        if self.cron:
            d["cron"] = self.cron
        if self.every_s:
            d["every"] = self.every_s
        if self.at:
            d["at"] = self.at.astimezone(self.zone).isoformat()
        return d

    def describe(self) -> str:
        if self.cron:
            return f"cron '{self.cron}' ({self.tz})"
        if self.every_s:
            return f"every {self.every_s}s"
        assert self.at is not None
        return f"once at {self.at.astimezone(self.zone).isoformat()}"


def parse_timing(*, cron: str | None = None, every: Any = None, at: Any = None, tz: str | None = None) -> Timing:
    """Validate a timing; :class:`InvalidInput` names the field that is wrong."""
    given = [name for name, v in (("cron", cron), ("every", every), ("at", at)) if v not in (None, "")]
    if len(given) != 1:
        raise InvalidInput("give exactly one of cron, every or at")
    tz = tz or "UTC"
    try:
        zone = ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise InvalidInput(f"tz: unknown timezone {tz!r}") from exc
    if cron:
        if not isinstance(cron, str) or len(cron.split()) != 5 or not croniter.is_valid(cron):
            raise InvalidInput(f"cron: {cron!r} is not a five-field cron expression (minute hour day month weekday)")
        return Timing(cron=" ".join(cron.split()), tz=tz)
    if every not in (None, ""):
        try:
            seconds = parse_duration(every)
        except ValueError as exc:
            raise InvalidInput(f"every: {exc}") from exc
        if seconds < 1 or seconds != int(seconds):
            raise InvalidInput(f"every: must be a whole number of seconds, at least 1, not {every!r}")
        return Timing(every_s=int(seconds), tz=tz)
    when = _parse_datetime(at, zone)
    return Timing(at=when.replace(microsecond=0), tz=tz)


def _parse_datetime(value: Any, zone: ZoneInfo) -> datetime:
    if isinstance(value, datetime):
        dt = value
    else:
        try:
            dt = datetime.fromisoformat(str(value).strip().replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInput(f"at: {value!r} is not an ISO 8601 date-time such as 2026-05-05T09:00") from exc
    return dt.replace(tzinfo=zone) if dt.tzinfo is None else dt


def slot_id(slot: datetime) -> str:
    """A slot as it appears in run and utterance ids: UTC, compact, e.g. ``20260505T070000Z``."""
    return slot.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_slot_id(value: str) -> datetime:
    """Inverse of :func:`slot_id`; also accepts ISO 8601."""
    try:
        return datetime.strptime(value, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return _parse_datetime(value, ZoneInfo("UTC")).astimezone(UTC)


def latest_slot(timing: Timing, anchor: float, now: datetime) -> datetime | None:
    """The latest slot at or before ``now`` (UTC), or None; ``anchor`` is the ``every`` grid origin."""
    if timing.at is not None:
        return timing.at.astimezone(UTC) if timing.at <= now else None
    if timing.every_s:
        origin = math.floor(anchor)
        k = math.floor((now.timestamp() - origin) / timing.every_s)
        return datetime.fromtimestamp(origin + k * timing.every_s, UTC) if k >= 0 else None
    assert timing.cron is not None
    local = now.astimezone(timing.zone).replace(second=0, microsecond=0)
    if croniter.match(timing.cron, local):
        return local.astimezone(UTC)
    prev: datetime = croniter(timing.cron, local).get_prev(datetime)
    return prev.astimezone(UTC)


def next_slot(timing: Timing, anchor: float, after: datetime) -> datetime | None:
    """The first slot strictly after ``after``, or None (a one-off that has passed)."""
    if timing.at is not None:
        return timing.at.astimezone(UTC) if timing.at > after else None
    if timing.every_s:
        origin = math.floor(anchor)
        k = max(0, math.floor((after.timestamp() - origin) / timing.every_s) + 1)
        return datetime.fromtimestamp(origin + k * timing.every_s, UTC)
    assert timing.cron is not None
    nxt: datetime = croniter(timing.cron, after.astimezone(timing.zone)).get_next(datetime)
    return nxt.astimezone(UTC)


def is_slot(timing: Timing, anchor: float, slot: datetime) -> bool:
    """Whether ``slot`` is one of the timing's slots."""
    return latest_slot(timing, anchor, slot) == slot.astimezone(UTC)


def _whole_hour_offsets(zone: ZoneInfo, start: datetime) -> bool:
    for week in range(0, 60):
        offset = (start + timedelta(weeks=week)).astimezone(zone).utcoffset() or timedelta(0)
        if offset.total_seconds() % 3600:
            return False
    return True


def trigger(timing: Timing, beat_app: Celery) -> Any:
    """The RedBeat schedule that publishes this timing's firings (a superset for cron)."""
    if timing.every_s:
        return interval_schedule(run_every=timedelta(seconds=timing.every_s), app=beat_app)
    if timing.at is not None:
        from redbeat.schedules import rrule

        return rrule("SECONDLY", dtstart=timing.at.astimezone(UTC), count=1, app=beat_app)
    assert timing.cron is not None
    minute = timing.cron.split()[0]
    if minute != "*" and _whole_hour_offsets(timing.zone, datetime.now(UTC)):
        try:
            return crontab(minute=minute, app=beat_app)
        except ValueError:
            pass  # croniter syntax crontab does not read: every minute, filtered by the task
    return crontab(minute="*", app=beat_app)
