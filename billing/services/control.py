"""Switches the system sets for itself.

A 401 or 403 from Fatora means the merchant's key is wrong or inactive: no retry will fix it, and
failing customers for it would be wrong. Collection pauses and an alert is raised; a human fixes
the key and runs ``billing collection resume``.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import Session

from billing.db import insert_for
from billing.models import ControlFlag
from billing.services.events import record_event

COLLECTION_PAUSED = "collection_paused"


def collection_paused(session: Session) -> str | None:
    """The reason collection is paused, or None when it runs."""
    flag = session.get(ControlFlag, COLLECTION_PAUSED)
    return flag.value if flag is not None else None


def pause_collection(session: Session, reason: str, now: datetime) -> None:
    """Pause collection and raise one alert. Safe to call for every 401 of a batch, and from
    workers racing each other: the first pause wins, the others change nothing."""
    stmt = (
        insert_for(session, ControlFlag)
        .values(name=COLLECTION_PAUSED, value=reason[:500], updated_at=now)
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(ControlFlag.name)
    )
    if session.execute(stmt).scalar_one_or_none() is None:
        return  # already paused
    record_event(session, "alert.collection_paused", now=now, payload={"reason": reason[:200]})


def resume_collection(session: Session, now: datetime) -> bool:
    flag = session.get(ControlFlag, COLLECTION_PAUSED)
    if flag is None:
        return False
    session.delete(flag)
    record_event(session, "collection.resumed", now=now, payload={})
    return True
