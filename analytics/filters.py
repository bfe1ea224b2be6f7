"""Which usage rows a report covers: a time window (UTC; since inclusive, until exclusive), user, model,
cluster, group and traffic (interactive or batch), as SQL with parameters."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any

from core.timewindow import parse_time_bound

# Interactive requests and batch lines, told apart by a usage row's batch_id.
TRAFFIC_SQL = "(CASE WHEN batch_id IS NULL THEN 'interactive' ELSE 'batch' END)"
TRAFFIC_KINDS = ("interactive", "batch")


class UsageQueryError(ValueError):
    """An analyst's query was refused (it tried to write, or to reach files) or is not valid SQL."""


def _as_utc(value: datetime | date | str | None, name: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):  # the CLI's and the API's forms: "30m", "7d", "2w" or ISO 8601
        value = parse_time_bound(value, datetime.now(UTC), name)
        if value is None:
            return None
    if not isinstance(value, datetime):  # a date: its UTC midnight
        value = datetime.combine(value, time())
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


@dataclass(frozen=True)
class UsageFilter:
    """Which usage rows a report looks at; every field left ``None`` matches everything.

    ``since`` is inclusive and ``until`` exclusive; they may be datetimes (naive = UTC), dates (UTC
    midnight) or strings in the CLI's and the API's forms (ISO 8601, or a span before now: ``7d``, ``2w``),
    and are stored as aware UTC datetimes.  ``group`` matches rows whose
    ``groups`` list contains it.
    """

    since: datetime | None = None
    until: datetime | None = None
    user: str | None = None
    model: str | None = None
    cluster: str | None = None
    group: str | None = None
    traffic: str | None = None  # "interactive" (no batch) or "batch" (batch lines)

    def __post_init__(self) -> None:
        if self.traffic is not None and self.traffic not in TRAFFIC_KINDS:
            raise ValueError(f"traffic must be one of {', '.join(TRAFFIC_KINDS)}, not {self.traffic!r}")
        object.__setattr__(self, "since", _as_utc(self.since, "since"))
        object.__setattr__(self, "until", _as_utc(self.until, "until"))

    def where(self) -> tuple[str, dict[str, Any]]:
        """``("WHERE ... AND ...", params)`` for DuckDB named parameters, or ``("", {})`` when empty.

        The parameters are named after the fields (``$since``, ``$until``, ``$user``, ``$model``,
        ``$cluster``, ``$group``); only those in use are returned.
        """
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.since is not None:
            clauses.append("ts >= $since")
            params["since"] = self.since
        if self.until is not None:
            clauses.append("ts < $until")
            params["until"] = self.until
        if self.user is not None:
            clauses.append('"user" = $user')
            params["user"] = self.user
        if self.model is not None:
            clauses.append("model = $model")
            params["model"] = self.model
        if self.cluster is not None:
            clauses.append("cluster = $cluster")
            params["cluster"] = self.cluster
        if self.group is not None:
            clauses.append('list_contains("groups", $group)')
            params["group"] = self.group
        if self.traffic is not None:
            clauses.append(f"{TRAFFIC_SQL} = $traffic")
            params["traffic"] = self.traffic
        return ("WHERE " + " AND ".join(clauses) if clauses else ""), params

    def and_(self, condition: str) -> tuple[str, dict[str, Any]]:
        """:meth:`where` with one more SQL condition ANDed in."""
        where, params = self.where()
        return (f"{where} AND ({condition})" if where else f"WHERE {condition}"), params


_ALL = UsageFilter()
