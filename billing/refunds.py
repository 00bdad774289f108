"""Refunds, as pure decisions: what Fatora's answer to a refund (or verify's refund details)
means for the refund we recorded.

A refund is full only (Fatora documents no amount) and is asked for at most once per invoice
at a time. Like a charge, it is written before the call (``requested``), so a refund whose
answer is lost is never forgotten nor asked twice blindly: the next ``billing refund`` reads
verify's refund details first, and asks again only when verify shows none and the earlier
answer proved nothing moved.

==================================  ===========================================================
What was learnt                     The refund becomes
==================================  ===========================================================
refund or verify says completed     ``completed`` (the money is on its way back, or back)
refund or verify: another word      ``pending``: accepted; followed through verify
refund refused, verify shows none   ``rejected``: nothing moved; it may be asked again
no clear answer, verify shows none  stays ``requested``: asked again only after verify
==================================  ===========================================================
"""

from __future__ import annotations

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

# Answers to a refund call that prove it was refused before anything moved.
_REFUSED = frozenset({Answer.REJECTED, Answer.NOT_FOUND, Answer.AUTH, Answer.NOT_SENT})


def from_word(word: str | None) -> RefundStatus:
    """A refund status Fatora reported (in the refund's answer or verify's refund details)."""
    if word is not None and word.strip().lower() in _DONE_WORDS:
        return RefundStatus.COMPLETED
    return RefundStatus.PENDING


def after_error(answer: Answer, seen_by_verify: str | None, verified: bool) -> RefundStatus:
    """The refund's status after its call failed with ``answer``.

    ``verified`` says whether verify could be read afterwards, and ``seen_by_verify`` is the
    refund status it showed (None: no refund on the payment). Without a readable verify,
    nothing is concluded.
    """
    if seen_by_verify is not None:
        return from_word(seen_by_verify)
    if verified and answer in _REFUSED:
        return RefundStatus.REJECTED
    return RefundStatus.REQUESTED


def is_settled(status: RefundStatus) -> bool:
    return status in (RefundStatus.COMPLETED, RefundStatus.REJECTED)
