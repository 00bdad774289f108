"""Regressions for the review of the charge path, on the real PostgreSQL.

Each test turns one reproduction of the review into the invariant it broke: an invoice is
charged at most once and every charge ends up recorded; a failure of our key, route or gateway
kills no card and duns no one (collection pauses instead); a decline is final only once the
gateway confirms it; and no invoice loops quietly for ever.

The gateway is the in-process sandbox behind an ``Edge`` the test controls per route: it can
answer in the sandbox's place (the request never reaches it) or rewrite the sandbox's answer
(the sandbox did act on the request, e.g. took the money).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from itertools import pairwise

import httpx
import pytest
from sqlalchemy import Engine, select

from billing.attempts import SEND_WINDOW, AttemptStatus, CallEnding
from billing.clock import FixedClock
from billing.crypto import TokenVault
from billing.fatora.client import FatoraClient
from billing.fatora.sandbox import Sandbox, SandboxTransport
from billing.lifecycle import InvoiceStatus, SubscriptionStatus
from billing.models import CardToken, ChargeAttempt, Event
from billing.runtime import Runtime
from billing.services import charging, control
from billing.services.charging import collect_invoices
from schedules.sweeps import run_janitor
from tests.factories import (
    Monotonic,
    age_attempts,
    attempts_of,
    invoice_of,
    renew,
    seed_plans,
    subscriber,
    subscription_of,
    successful_charges,
)
from tests.integration.conftest import START, make_runtime

# -- an edge in front of the sandbox ---------------------------------------------------------

Replace = Callable[[httpx.Request], httpx.Response]
Rewrite = Callable[[httpx.Request, httpx.Response], httpx.Response]


class Edge(httpx.BaseTransport):
    """The sandbox behind an edge that a test controls per route (the path's last segment:
    "collect-payment", "verify"). ``replace[route]`` answers in the sandbox's place: the
    request never reaches it. ``rewrite[route]`` changes the sandbox's answer after it acted."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.inner = SandboxTransport(sandbox)
        self.replace: dict[str, Replace] = {}
        self.rewrite: dict[str, Rewrite] = {}
        self.calls: list[str] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        route = request.url.path.rsplit("/", 1)[-1]
        self.calls.append(route)
        replace = self.replace.get(route)
        if replace is not None:
            request.read()
            return replace(request)
        response = self.inner.handle_request(request)
        rewrite = self.rewrite.get(route)
        if rewrite is None:
            return response
        response.read()
        return rewrite(request, response)

    def clear(self) -> None:
        self.replace.clear()
        self.rewrite.clear()


def _json(status: int, payload: object) -> httpx.Response:
    return httpx.Response(
        status, headers={"content-type": "application/json"}, content=json.dumps(payload).encode()
    )


def _answer(status: int, payload: object) -> Callable[..., httpx.Response]:
    """A fixed answer, usable both as a replacement and as a rewrite."""
    return lambda *_: _json(status, payload)


def _timeout(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("no answer", request=request)


def _edge_runtime(
    engine: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault, *, live: bool = False
) -> tuple[Runtime, Edge]:
    rt = make_runtime(engine, sandbox, clock, vault, live=live)
    edge = Edge(sandbox)
    rt.gateway = FatoraClient(
        "http://sandbox.test/v1",
        sandbox.api_key,
        mode="live" if live else "test",
        timeout_s=5,
        transport=edge,
    )
    return rt, edge


def _kinds(rt: Runtime) -> list[str]:
    with rt.sessions() as session:
        return list(session.execute(select(Event.kind).order_by(Event.id)).scalars())


def _events(rt: Runtime, kind: str) -> list[Event]:
    with rt.sessions() as session:
        query = select(Event).where(Event.kind == kind).order_by(Event.id)
        return list(session.execute(query).scalars())


def _paused(rt: Runtime) -> str | None:
    with rt.sessions() as session:
        return control.collection_paused(session)


def _resume(rt: Runtime) -> None:
    with rt.sessions() as session, session.begin():
        control.resume_collection(session, rt.clock.now())


def _dead_cards(rt: Runtime) -> int:
    with rt.sessions() as session:
        cards = session.execute(select(CardToken).where(CardToken.status == "dead")).scalars()
        return len(list(cards))


def _card_of(rt: Runtime, invoice_id: int) -> CardToken:
    (attempt, *_) = attempts_of(rt, invoice_id)
    with rt.sessions() as session:
        card = session.get(CardToken, attempt.card_token_id)
        assert card is not None
        return card


def _sub_status(rt: Runtime, invoice_id: int) -> str:
    return subscription_of(rt, invoice_of(rt, invoice_id).subscription_id).status


def _settle_and_recollect(rt: Runtime, clock: FixedClock, invoice_ids: list[int]) -> None:
    """Long after the grace: verify settles what is unknown, then what was never charged is
    charged once its quick retry is due."""
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    collect_invoices(rt, invoice_ids)
    clock.advance(timedelta(minutes=1))
    collect_invoices(rt, invoice_ids)


# -- 1. only a 401/403 or an unsent request is a final 'no money moved' on collect -----------


def _collect_in_test_mode(request: httpx.Request, response: httpx.Response) -> httpx.Response:
    body = json.loads(response.content)
    body["result"]["mode"] = "test"
    return _json(200, body)


_AFTER_THE_CHARGE: dict[str, Rewrite] = {
    "test_mode": _collect_in_test_mode,
    "503_about_authentication": _answer(
        503, {"status": "ERROR", "error": "Authentication service unavailable, try later"}
    ),
    "200_about_authentication": _answer(
        200, {"status": "ERROR", "error": "Issuer authentication step timed out after capture"}
    ),
    "200_invalid_api_key": _answer(200, {"status": "FAILURE", "error": "Invalid API Key"}),
}


@pytest.mark.parametrize("answer", sorted(_AFTER_THE_CHARGE))
def test_money_taken_behind_a_no_money_looking_answer_is_recorded_and_never_charged_twice(
    clean_db: Engine, clock: FixedClock, vault: TokenVault, answer: str
) -> None:
    """Exactly once, every charge recorded: the gateway took the money, then answered in test
    mode, with a 5xx or with words about authentication or the key (no 401/403). Such an answer
    is never a final 'no money moved': the attempt is verified (or kept unresolved), and once
    collection runs again normally the invoice is paid by that one charge, not charged again."""
    sandbox = Sandbox(now=lambda: START, mode="live")  # verify reports a live charge
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault, live=True)
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    edge.rewrite["collect-payment"] = _AFTER_THE_CHARGE[answer]

    collect_invoices(rt, [invoice_id])
    (attempt,) = attempts_of(rt, invoice_id)
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    assert attempt.status not in (AttemptStatus.FAILED.value, AttemptStatus.DECLINED.value)

    edge.clear()  # the operator repairs whatever it was and resumes collection
    _resume(rt)
    _settle_and_recollect(rt, clock, [invoice_id])
    run_janitor(rt, everything=True)

    assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.SUCCEEDED.value
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.PAID.value
    assert invoice.paid_attempt_id == attempt.id


def test_a_test_mode_collect_answer_is_an_accepted_charge_and_pauses_collection(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """No charge lost, nothing charged twice: a test-mode result reaching a live client means
    the gateway took the charge under a wrong key or URL. The attempt stays unresolved with
    call_ending 'accepted' (a later 'not found' can never write it off) and collection pauses;
    no second attempt is made while it is unresolved."""
    sandbox = Sandbox(now=lambda: START, mode="live")
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault, live=True)
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    edge.rewrite["collect-payment"] = _collect_in_test_mode

    report = collect_invoices(rt, [invoice_id])
    (attempt,) = attempts_of(rt, invoice_id)
    assert report.results[invoice_id] == "collection_paused"
    assert (attempt.status, attempt.call_ending) == ("unknown", CallEnding.ACCEPTED.value)
    assert _paused(rt) is not None

    edge.clear()
    _resume(rt)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(attempts_of(rt, invoice_id)) == 1
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


# -- 2a. a decline is final only once verify reports the failed payment ----------------------


def test_a_decline_answer_over_a_charge_verify_does_not_know_yet_is_not_final(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """Exactly once, every charge recorded: collect answers 'Do not honor' but the gateway did
    take the money, and verify lags. The decline is held (the attempt stays unknown, nobody is
    dunned, nothing is charged again); when verify catches up, the charge pays the invoice."""
    mono = Monotonic()
    sandbox = Sandbox(now=lambda: START, verify_lag_s=120, monotonic=mono)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["verify_lags"])
    (invoice_id,) = renew(rt)
    edge.rewrite["collect-payment"] = _answer(200, {"status": "FAILURE", "error": "Do not honor"})

    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == AttemptStatus.UNKNOWN.value
    assert attempt.classification == "soft_decline"
    assert attempt.call_ending == CallEnding.ANSWERED.value
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert invoice_of(rt, invoice_id).failure_count == 0
    edge.clear()

    clock.advance(timedelta(days=1))  # the day a dunning step would have charged again
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert len(attempts_of(rt, invoice_id)) == 1
    mono.now += 3600  # verify sees the payment now
    clock.advance(timedelta(days=1))
    collect_invoices(rt, [invoice_id])
    run_janitor(rt, everything=True)

    assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    assert [a.status for a in attempts_of(rt, invoice_id)] == ["succeeded"]
    assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert _events(rt, "invoice.payment_failed") == []


@pytest.mark.parametrize(
    ("wording", "classification", "card_after"),
    [("Do not honor", "soft_decline", "active"), ("Card token expired", "hard_decline", "dead")],
)
def test_a_decline_verify_never_knows_becomes_final_only_after_the_grace(
    clean_db: Engine,
    clock: FixedClock,
    vault: TokenVault,
    wording: str,
    classification: str,
    card_after: str,
) -> None:
    """A real decline is still a decline, but only once 'not found' is final: while verify
    does not know the payment, the decline is held (unknown, no card touched, no dunning, no
    new attempt); after the grace from the send it is recorded as the decline it was."""
    sandbox = Sandbox(now=lambda: START)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    edge.replace["collect-payment"] = _answer(200, {"status": "FAILURE", "error": wording})

    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    (attempt,) = attempts_of(rt, invoice_id)
    assert (attempt.status, attempt.classification, attempt.call_ending) == (
        "unknown",
        classification,
        "answered",
    )
    assert _card_of(rt, invoice_id).status == "active"
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert len(attempts_of(rt, invoice_id)) == 1

    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    (attempt,) = attempts_of(rt, invoice_id)
    assert (attempt.status, attempt.classification) == ("declined", classification)
    assert _card_of(rt, invoice_id).status == card_after
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.PAST_DUE.value
    assert len(_events(rt, "invoice.payment_failed")) == 1
    assert sandbox.charges() == []


# -- 3. a stale 'never charged' is checked against the locked row ----------------------------


def test_a_stale_not_found_never_writes_off_an_attempt_now_marked_accepted(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """Exactly once (two workers on one attempt, interleaved by hand): worker A reads the
    attempt before worker W1 records that the gateway accepted the charge; A's 'not found is
    final', computed from that stale snapshot, must not settle the row as never charged. It
    stays unknown (accepted), nothing is charged again, and the charge pays the invoice once
    verify sees it."""
    mono = Monotonic()
    sandbox = Sandbox(now=lambda: START, verify_lag_s=3600, monotonic=mono)
    rt = make_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    subscriber(rt, sandbox, ["verify_lags"])
    (invoice_id,) = renew(rt)

    (w1_call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    w1_outcome = charging._charge(rt, w1_call, charging._Run())  # money taken, verify lags
    assert w1_outcome.ending is CallEnding.ACCEPTED
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # W1 stalled this long (compressed)
    (a_call,) = charging._unresolved_calls(rt, [invoice_id])  # A's snapshot: no ending yet
    assert a_call.ending is None

    charging._record(rt, [(w1_call, w1_outcome)], charging.CollectionReport())
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)  # only 'accepted' can keep it open now
    a_outcome = charging._verify(rt, a_call, datetime.now(UTC), charging._Run())
    assert a_outcome.classification == "never_charged"  # what the stale snapshot concludes
    report = charging.CollectionReport()
    charging._record(rt, [(a_call, a_outcome)], report)

    (row,) = attempts_of(rt, invoice_id)
    assert (row.status, row.call_ending) == ("unknown", CallEnding.ACCEPTED.value)
    assert report.results[invoice_id] == "unknown"
    clock.advance(timedelta(minutes=10))
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "unknown"
    assert len(attempts_of(rt, invoice_id)) == 1
    mono.now += 3600
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_a_stale_not_found_never_writes_off_an_attempt_now_sent_within_the_grace(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """Exactly once (two workers, by hand): A's snapshot has no send moment and an old write
    mark, so its 'not found' looks final; meanwhile W1 recorded that it sent the request just
    now, with no answer. The row as it is now decides: within the grace after the send it
    stays unknown, and the charge that lands later pays the invoice once."""
    mono = Monotonic()
    sandbox = Sandbox(now=lambda: START, land_delay_s=60, monotonic=mono)
    rt = make_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    subscriber(rt, sandbox, ["timeout_lands_later"])
    (invoice_id,) = renew(rt)

    (w1_call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    (a_call,) = charging._unresolved_calls(rt, [invoice_id])  # A's snapshot: never sent, old
    w1_outcome = charging._charge(rt, w1_call, charging._Run())  # sent now, no answer
    assert w1_outcome.status is AttemptStatus.UNKNOWN and w1_outcome.sent_wall_at is not None
    charging._record(rt, [(w1_call, w1_outcome)], charging.CollectionReport())

    a_outcome = charging._verify(rt, a_call, datetime.now(UTC), charging._Run())
    assert a_outcome.classification == "never_charged"
    report = charging.CollectionReport()
    charging._record(rt, [(a_call, a_outcome)], report)

    (row,) = attempts_of(rt, invoice_id)
    assert row.status == AttemptStatus.UNKNOWN.value
    assert report.results[invoice_id] == "unknown"
    clock.advance(timedelta(minutes=10))
    collect_invoices(rt, [invoice_id])
    assert len(attempts_of(rt, invoice_id)) == 1
    mono.now += 120  # the held request lands
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


# -- 4. a systemic answer is not a hard decline ----------------------------------------------

_SYSTEMIC = {
    "invalid_token": (400, {"status": "ERROR", "error": "Invalid token"}),
    "access_token_expired": (200, {"status": "FAILURE", "error": "Access token expired"}),
    "request_expired": (200, {"status": "ERROR", "error": "Request expired, please retry"}),
}


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("wording", sorted(_SYSTEMIC))
def test_a_systemic_answer_kills_no_card_in_small_runs(
    clean_db: Engine, clock: FixedClock, vault: TokenVault, wording: str, batch: int
) -> None:
    """No customer harmed by our failure: 'Invalid token' (the merchant's key is a 'token' in
    Fatora's API), 'Access token expired' or 'Request expired' is not a card's death. In runs
    of any size no card is marked dead and no one is dunned; words about the key pause
    collection. Once repaired, every invoice is charged exactly once."""
    status, body = _SYSTEMIC[wording]
    sandbox = Sandbox(now=lambda: START)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    for i in range(8):
        subscriber(rt, sandbox, ["success"], name=f"c{i}")
    invoice_ids = renew(rt)
    edge.replace["collect-payment"] = _answer(status, body)

    results: dict[int, str] = {}
    for start in range(0, len(invoice_ids), batch):
        results.update(collect_invoices(rt, invoice_ids[start : start + batch]).results)
    assert "hard_declined" not in results.values()
    assert _dead_cards(rt) == 0
    assert _events(rt, "invoice.payment_failed") == []
    if wording == "request_expired":  # unclear: verified, never believed
        assert set(results.values()) == {"unknown"}
    else:  # the merchant's key: collection pauses
        assert _paused(rt) is not None
        assert set(results.values()) <= {"auth_error", "collection_paused"}

    edge.clear()
    _resume(rt)
    _settle_and_recollect(rt, clock, invoice_ids)
    for invoice_id in invoice_ids:
        assert invoice_of(rt, invoice_id).status == InvoiceStatus.PAID.value
        assert len(successful_charges(rt, sandbox, invoice_id)) == 1
    assert _dead_cards(rt) == 0


def test_the_breaker_across_runs_stops_hard_declines_that_no_single_run_judges(
    rt: Runtime, sandbox: Sandbox
) -> None:
    """No customer harmed by our failure, however small the runs: one invoice per run, every
    answer a (confirmed) hard decline. Once the last hour holds FLEET_MIN_HARD hard declines
    making up at least half of what was settled, further hard declines are suspects: collection
    pauses and no further card is marked dead."""
    seed_plans(rt)
    for i in range(charging.FLEET_MIN_HARD + 2):
        subscriber(rt, sandbox, ["expired_token"], name=f"c{i:02d}")
    invoice_ids = renew(rt)

    results = [collect_invoices(rt, [invoice_id]).results[invoice_id] for invoice_id in invoice_ids]
    believed = charging.FLEET_MIN_HARD - 1
    assert results[:believed] == ["hard_declined"] * believed
    assert results[believed] == "suspect_decline"
    assert set(results[believed + 1 :]) == {"collection_paused"}
    reason = _paused(rt)
    assert reason is not None and "hard declines" in reason
    assert _dead_cards(rt) == believed
    assert len(_events(rt, "invoice.payment_failed")) == believed
    for invoice_id in invoice_ids[believed:]:
        assert _sub_status(rt, invoice_id) == SubscriptionStatus.ACTIVE.value


# -- 5. a verify FAILURE about the key is not the customer's ---------------------------------


@pytest.mark.parametrize(
    "description", ["Merchant token expired", "Invalid API Key", "Access token expired"]
)
def test_a_verify_failure_about_the_key_pauses_collection_and_spares_the_customer(
    clean_db: Engine, clock: FixedClock, vault: TokenVault, description: str
) -> None:
    """No customer harmed by our failure: collect gets no answer and verify reports a FAILURE
    payment whose description is about the merchant's key. No money moved (the attempt fails
    as auth_error), collection pauses, the card stays alive and nobody is dunned; the invoice
    is collected as soon as collection resumes."""
    sandbox = Sandbox(now=lambda: START)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)

    def verify(request: httpx.Request) -> httpx.Response:
        order_id = json.loads(request.content)["order_id"]
        result = {"order_id": order_id, "payment_status": "FAILURE", "description": description}
        return _json(200, {"status": "FAILURE", "result": result})

    edge.replace["collect-payment"] = _timeout
    edge.replace["verify"] = verify
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "auth_error"
    (attempt,) = attempts_of(rt, invoice_id)
    assert (attempt.status, attempt.classification) == ("failed", "auth_error")
    assert _paused(rt) is not None
    assert _card_of(rt, invoice_id).status == "active"
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert invoice_of(rt, invoice_id).failure_count == 0
    assert _events(rt, "invoice.payment_failed") == []

    edge.clear()
    _resume(rt)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


# -- 6. word collisions: the merchant's limit, one cardholder's 3-D Secure --------------------


def test_a_merchant_limit_pauses_collection_and_duns_no_one(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """No customer harmed by our failure: 'Merchant monthly volume limit exceeded' is about the
    merchant's account, not twenty customers' cards. Collection pauses; no subscription goes
    past due, no payment-failed notice is sent."""
    sandbox = Sandbox(now=lambda: START)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    for i in range(20):
        subscriber(rt, sandbox, ["success"], name=f"c{i:02d}")
    invoice_ids = renew(rt)
    edge.replace["collect-payment"] = _answer(
        200, {"status": "ERROR", "error": "Merchant monthly volume limit exceeded"}
    )

    report = collect_invoices(rt, invoice_ids)
    assert set(report.results.values()) == {"auth_error"}
    assert _paused(rt) is not None
    assert {_sub_status(rt, i) for i in invoice_ids} == {SubscriptionStatus.ACTIVE.value}
    assert _events(rt, "invoice.payment_failed") == []
    assert _dead_cards(rt) == 0


def test_one_cardholders_authentication_failure_is_that_customers_soft_decline_only(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """A decline stays one customer's: 'Cardholder authentication failed' (3-D Secure) is a
    soft decline of that card, not the merchant's key. Collection never pauses, the next
    customer is charged, and once the decline is final only that customer is dunned."""
    sandbox = Sandbox(now=lambda: START)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"], name="bad")
    subscriber(rt, sandbox, ["success"], name="good")
    bad, good = renew(rt)
    edge.replace["collect-payment"] = _answer(
        200, {"status": "FAILURE", "error": "Cardholder authentication failed"}
    )
    assert collect_invoices(rt, [bad]).results[bad] == "unknown"  # held until final
    edge.clear()
    assert collect_invoices(rt, [good]).results[good] == "paid"
    assert _paused(rt) is None

    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    (attempt,) = attempts_of(rt, bad)
    assert (attempt.status, attempt.classification) == ("declined", "soft_decline")
    assert _paused(rt) is None
    assert _card_of(rt, bad).status == "active"
    assert _sub_status(rt, bad) == SubscriptionStatus.PAST_DUE.value
    assert _sub_status(rt, good) == SubscriptionStatus.ACTIVE.value
    assert [e.invoice_id for e in _events(rt, "invoice.payment_failed")] == [bad]


# -- 7. no dunning on a closed invoice -------------------------------------------------------


def test_a_decline_recorded_after_another_attempt_paid_the_invoice_duns_no_one(
    clean_db: Engine, clock: FixedClock, vault: TokenVault
) -> None:
    """A paid customer is never dunned. Two workers, by hand: W0's charge is taken but not
    recorded and verify lags; B writes it off after the grace and starts attempt 2, which is
    declined (and verify confirms the decline). Before B records it, a stalled worker's verify
    finds W0's money and pays the invoice. B's decline then does no dunning."""
    mono = Monotonic()
    sandbox = Sandbox(now=lambda: START, verify_lag_s=600, monotonic=mono)
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["verify_lags"])
    (invoice_id,) = renew(rt)

    (w0_call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    charging._charge(rt, w0_call, charging._Run())  # money taken; W0 dies before recording
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    (s_call,) = charging._unresolved_calls(rt, [invoice_id])  # the stalled worker's snapshot

    b_out = charging._verify(rt, s_call, datetime.now(UTC), charging._Run())
    assert b_out.classification == "never_charged"
    charging._record(rt, [(s_call, b_out)], charging.CollectionReport())
    clock.advance(timedelta(minutes=10))  # past the retry backoff
    (b_call,) = charging._start_attempts(rt, [invoice_id], charging.CollectionReport())
    decline = {"payment_status": "FAILURE", "description": "Insufficient Funds"}
    edge.replace["collect-payment"] = _answer(200, {"status": "FAILURE", "result": decline})
    edge.replace["verify"] = lambda request: _json(
        200,
        {
            "status": "FAILURE",
            "result": {**decline, "order_id": json.loads(request.content)["order_id"]},
        },
    )
    b_decline = charging._charge(rt, b_call, charging._Run())
    assert b_decline.status is AttemptStatus.DECLINED  # a confirmed decline, held in memory
    edge.clear()

    mono.now += 3600  # W0's payment is visible now
    s_out = charging._verify(rt, s_call, datetime.now(UTC), charging._Run())
    first = charging.CollectionReport()
    charging._record(rt, [(s_call, s_out)], first)
    assert first.results[invoice_id] == "paid"
    second = charging.CollectionReport()
    charging._record(rt, [(b_call, b_decline)], second)

    assert second.results[invoice_id] == "declined_after_close"
    invoice = invoice_of(rt, invoice_id)
    assert invoice.status == InvoiceStatus.PAID.value
    assert invoice.failure_count == 0
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert _events(rt, "invoice.payment_failed") == []
    assert [a.status for a in attempts_of(rt, invoice_id)] == ["succeeded", "declined"]
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


# -- 9. no endless quiet loop ----------------------------------------------------------------


def _fail_once_more(rt: Runtime, clock: FixedClock, invoice_id: int) -> timedelta:
    """One transient failure: collect gets a 503, verify settles it as never charged after the
    grace. Returns how long until the invoice is due again, and waits that long."""
    collect_invoices(rt, [invoice_id])
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    clock.advance(SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    invoice = invoice_of(rt, invoice_id)
    assert invoice.next_attempt_at is not None, "an open invoice is never forgotten"
    wait = max(invoice.next_attempt_at - clock.now(), timedelta(0))
    clock.advance(wait)
    return wait


def test_a_collect_that_always_fails_retries_slowly_and_alerts_daily(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """No endless quiet loop: a card whose every collect gets a 503 is retried fast a few
    times, then every SLOW_RETRY, with alert.collection_stalled repeated while it lasts but at
    most once a day. While no other invoice is being paid (the gateway may be down for all),
    the customer is not dunned for it."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["server_error_always"])
    (invoice_id,) = renew(rt)
    waits = [_fail_once_more(rt, clock, invoice_id) for _ in range(charging.TRANSIENT_LIMIT + 3)]

    fast = [w for w in waits if w < timedelta(minutes=5)]
    assert 1 <= len(fast) <= 5
    assert waits[len(fast) :] == [charging.SLOW_RETRY] * (len(waits) - len(fast))
    alerts = [e.created_at for e in _events(rt, "alert.collection_stalled")]
    assert len(alerts) >= 2  # repeated while it lasts...
    assert all(b - a >= charging.ALERT_REPEAT for a, b in pairwise(alerts))
    invoice = invoice_of(rt, invoice_id)
    assert (invoice.status, invoice.failure_count) == (InvoiceStatus.OPEN.value, 0)
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.ACTIVE.value
    assert sandbox.charges() == []


def test_a_card_that_keeps_failing_while_others_are_paid_takes_a_dunning_step(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """No endless loop: after TRANSIENT_LIMIT transient failures of one invoice, while other
    invoices were paid lately (the gateway works), its card is at fault: the invoice takes a
    dunning step (card_keeps_failing) that asks the customer for another card."""
    seed_plans(rt)
    sub_id = subscriber(rt, sandbox, ["server_error_always"], name="stuck")
    subscriber(rt, sandbox, ["success"], name="fine")
    stuck, fine = renew(rt)
    for _ in range(charging.TRANSIENT_LIMIT - 1):
        _fail_once_more(rt, clock, stuck)
    assert invoice_of(rt, stuck).transient_count == charging.TRANSIENT_LIMIT - 1
    assert invoice_of(rt, stuck).failure_count == 0
    assert collect_invoices(rt, [fine]).results[fine] == "paid"  # others are being paid

    _fail_once_more(rt, clock, stuck)
    invoice = invoice_of(rt, stuck)
    assert invoice.failure_count == 1 and invoice.transient_count == 0
    assert subscription_of(rt, sub_id).status == SubscriptionStatus.PAST_DUE.value
    (failed,) = _events(rt, "invoice.payment_failed")
    assert failed.invoice_id == stuck
    assert failed.payload["reason"] == "card_keeps_failing"
    assert len(successful_charges(rt, sandbox, stuck)) == 0


# -- later findings -----------------------------------------------------------------------------


def test_a_rejection_over_money_taken_is_recorded_as_paid(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault
) -> None:
    """No charge unrecorded: a 400 in Fatora's envelope is final (nothing is charged again by
    itself), but verify is asked once all the same, and money it shows pays the invoice."""
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    edge.rewrite["collect-payment"] = _answer(
        400, {"status": "ERROR", "error": "Invalid amount format"}
    )
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "paid"
    assert _events(rt, "alert.charge_rejected") == []
    assert len(successful_charges(rt, sandbox, invoice_id)) == 1


def test_an_old_attempt_settled_late_leaves_the_dunning_schedule_alone(
    rt: Runtime, sandbox: Sandbox, clock: FixedClock
) -> None:
    """A customer in dunning is charged on the ladder's schedule: an older attempt re-verified
    late (as the fence migration does for recent write-offs) and found never charged does not
    bring the next charge forward."""
    seed_plans(rt)
    subscriber(rt, sandbox, ["insufficient_funds"])
    (invoice_id,) = renew(rt)
    assert collect_invoices(rt, [invoice_id]).results[invoice_id] == "soft_declined"
    step = invoice_of(rt, invoice_id).next_attempt_at
    with rt.sessions() as session, session.begin():
        old = session.get(ChargeAttempt, attempts_of(rt, invoice_id)[0].id)
        assert old is not None
        session.add(
            ChargeAttempt(
                invoice_id=invoice_id,
                card_token_id=old.card_token_id,
                order_id="LEGACY-1",
                amount_minor=old.amount_minor,
                currency=old.currency,
                status="unknown",
                call_ending="no_answer",
                created_at=old.created_at,
                created_wall_at=old.created_wall_at,
                updated_at=old.updated_at,
                id=old.id - 1000,  # older than the decline
            )
        )
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    invoice = invoice_of(rt, invoice_id)
    assert invoice.next_attempt_at == step
    assert invoice.transient_count == 0


def test_a_decline_held_through_a_broken_verify_stays_a_decline(
    clean_db: Engine, sandbox: Sandbox, clock: FixedClock, vault: TokenVault
) -> None:
    """A customer's decline is not turned into a quick retry by our own outage: while verify's
    route is broken the held decline keeps its word, and once 'not found' is final it takes
    its dunning step."""
    rt, edge = _edge_runtime(clean_db, sandbox, clock, vault)
    seed_plans(rt)
    subscriber(rt, sandbox, ["success"])
    (invoice_id,) = renew(rt)
    edge.replace["collect-payment"] = _answer(
        200, {"status": "FAILURE", "error": "Insufficient funds"}
    )
    edge.replace["verify"] = lambda _request: httpx.Response(404, content=b"<html>404</html>")
    collect_invoices(rt, [invoice_id])
    (attempt,) = attempts_of(rt, invoice_id)
    assert (attempt.status, attempt.classification) == ("unknown", "soft_decline")
    assert _paused(rt) is not None
    edge.clear()
    _resume(rt)
    age_attempts(rt, SEND_WINDOW + rt.unknown_grace)
    run_janitor(rt, everything=True)
    (attempt,) = attempts_of(rt, invoice_id)
    assert attempt.status == "declined"
    assert invoice_of(rt, invoice_id).failure_count == 1
    assert sandbox.charges() == []
