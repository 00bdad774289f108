"""Refunds, as pure decisions: what Fatora's answer to a refund (or verify's refund details)
means for the refund we recorded, and when it may be asked for again.

A refund is full only (Fatora documents no amount). Like a charge, it is written before the
call, and the moment its request leaves is committed before it is sent (``sent_wall_at``): a
refund whose answer is lost is never forgotten nor asked for twice blindly. It is asked again
only when verify shows no refund and either the earlier request provably moved nothing
(``rejected``) or a grace period (``BILLING_UNKNOWN_GRACE_S``) has passed since it left: a
refund made but not yet shown by verify would otherwise be asked for twice.

======================================  =======================================================
What was learnt                         The refund becomes
======================================  =======================================================
refund or verify says completed         ``completed`` (the money is on its way back, or back)
refund or verify: another word          ``pending``: accepted; followed through verify
refused before anything could move      ``rejected``: it may be asked for again at once
(400/406/415, 401/403, 404, not sent)
anything else (422 "already refunded",  stays ``requested``: verify is read first next time,
5xx, timeout, garbled), verify: none    and it is asked again only after the grace
======================================  =======================================================
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

from billing.fatora.answers import Answer


class RefundStatus(StrEnum):
    REQUESTED = "requested"  # written before the call; its outcome is not known
    PENDING = "pending"  # Fatora accepted it; verify tells when it completes
    COMPLETED = "completed"
    REJECTED = "rejected"  # Fatora refused it; nothing moved


# Words meaning the refund went through. Fatora's page shows "co…" (probably "completed");
# other words are not documented, and count as accepted but not complete.
_DONE_WORDS = frozenset({"completed", "complete", "success", "succeeded", "refunded", "done"})

# Answers to a refund call that prove it was refused before anything moved. A 422 is not one:
# Fatora answers it for a payment already refunded (by this request's lost twin, maybe).
_REFUSED = frozenset({Answer.REJECTED, Answer.NOT_FOUND, Answer.AUTH, Answer.NOT_SENT})
_UNPROCESSABLE = 422


def from_word(word: str | None) -> RefundStatus:
    """A refund status Fatora reported (in the refund's answer or verify's refund details)."""
    if word is not None and word.strip().lower() in _DONE_WORDS:
        return RefundStatus.COMPLETED
    return RefundStatus.PENDING


def after_error(
    answer: Answer, http_status: int | None, seen_by_verify: str | None, verified: bool
) -> RefundStatus:
    """The refund's status after its call failed with ``answer`` (HTTP ``http_status``).

    ``verified`` says whether verify could be read afterwards, and ``seen_by_verify`` is the
    refund status it showed (None: no refund on the payment). Without a readable verify,
    nothing is concluded.
    """
    if seen_by_verify is not None:
        return from_word(seen_by_verify)
    if verified and answer in _REFUSED and http_status != _UNPROCESSABLE:
        return RefundStatus.REJECTED
    return RefundStatus.REQUESTED


def may_ask_again(
    status: RefundStatus, sent_wall_at: datetime | None, wall_now: datetime, grace: timedelta
) -> bool:
    """With verify showing no refund: may Fatora be asked (again)? Never asked: yes. Refused
    before anything moved: yes. Otherwise only once the grace has passed since it was sent."""
    if sent_wall_at is None or status is RefundStatus.REJECTED:
        return True
    if status is not RefundStatus.REQUESTED:
        return False
    return wall_now - sent_wall_at >= grace


def is_settled(status: RefundStatus) -> bool:
    return status in (RefundStatus.COMPLETED, RefundStatus.REJECTED)
