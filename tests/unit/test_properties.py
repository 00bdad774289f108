"""Properties, checked on generated inputs: the calendar, money, the answer table and the query
string of the page Fatora sends a customer back to.

Each property is stated apart from the code it checks. They extend the example-based tests of
each module (test_periods, test_money, test_answers, test_fatora_parsing) to inputs nobody
writes by hand: random instants against any schedule, every currency Babel knows, JSON bodies
of every shape under every status code, and tokens made of the characters that break URLs.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import unicodedata
from collections.abc import MutableMapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, cast
from urllib.parse import quote, quote_plus
from zoneinfo import ZoneInfo

import httpx
import pytest
from babel.numbers import list_currencies
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from billing.attempts import Expected, payment_mismatch
from billing.fatora.answers import VERDICTS, Call, Money, classify, verdict
from billing.fatora.client import FatoraClient
from billing.fatora.errors import FatoraError
from billing.fatora.parsing import parse_redirect_params
from billing.fatora.types import PaymentStatus
from billing.money import (
    currency_exponent,
    format_money,
    from_minor,
    parse_amount,
    quantize,
    to_minor,
)
from billing.periods import (
    CronSchedule,
    Interval,
    IntervalSchedule,
    Period,
    first_period,
    next_period,
    period_containing,
)
from billing.runtime import Runtime
from billing.services import paylink
from billing.web import create_app
from tests.corpus.answers import confirms

QUICK = settings(max_examples=200, deadline=None)
SLOW = settings(max_examples=60, deadline=None)

# --- the calendar ----------------------------------------------------------------------------

# Zones whose clocks do odd things: a two-hour DST (Troll), a day that never was (Apia skipped
# 30 Dec 2011), DST changes at midnight (Santiago), a 30-minute DST (Lord Howe), none (Qatar).
ZONES = [
    "Asia/Qatar",
    "Europe/London",
    "America/New_York",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Antarctica/Troll",
    "Pacific/Apia",
]
instants = st.datetimes(
    min_value=datetime(2005, 1, 1), max_value=datetime(2045, 1, 1), timezones=st.just(UTC)
)


@st.composite
def interval_schedules(draw: st.DrawFn) -> IntervalSchedule:
    tz = draw(st.sampled_from(ZONES))
    unit = draw(st.sampled_from(list(Interval)))
    count = draw(st.integers(1, 3) | st.sampled_from([6, 12, 13]))
    anchor = draw(instants)
    return IntervalSchedule(unit, count, anchor, tz)


CRONS = ["0 9 * * MON", "30 2 * * *", "0 0 L * *", "*/45 1-3 * * *", "0 0 29 2 *", "@monthly"]


@st.composite
def cron_schedules(draw: st.DrawFn) -> CronSchedule:
    return CronSchedule(draw(st.sampled_from(CRONS)), draw(st.sampled_from(ZONES)))


def wall(instant: datetime, tz: str) -> datetime:
    return instant.astimezone(ZoneInfo(tz)).replace(tzinfo=None)


@QUICK
@given(interval_schedules(), instants)
def test_the_period_containing_an_instant_holds_it_and_is_followed_by_the_next(
    schedule: IntervalSchedule, at: datetime
) -> None:
    """Any instant after the anchor, not only a boundary, lies in exactly one period, and the
    period after it starts where it ends."""
    assume(at >= schedule.boundary(0))
    period = period_containing(schedule, at)
    assert period.start <= at < period.end
    following = next_period(schedule, period)
    assert following.start == period.end < following.end
    assert period_containing(schedule, period.end) == following


@QUICK
@given(interval_schedules(), instants, st.integers(1, 60 * 24 * 40))
def test_the_next_period_of_any_period_starts_at_its_end_and_ends_after_it(
    schedule: IntervalSchedule, end: datetime, minutes: int
) -> None:
    """A period from elsewhere (another plan before a change, a resumed pause) is followed
    contiguously, by a period that ends strictly later, on one of this schedule's boundaries."""
    foreign = Period(end - timedelta(minutes=minutes), end)
    following = next_period(schedule, foreign)
    assert following.start == end < following.end
    if following.end > schedule.boundary(0):
        assert period_containing(schedule, following.end).start == following.end
    else:
        assert following.end == schedule.boundary(0)


@QUICK
@given(interval_schedules(), instants)
def test_the_first_period_from_any_start_is_the_first_boundary_at_or_after_it(
    schedule: IntervalSchedule, start: datetime
) -> None:
    period = first_period(schedule, start)
    assert period.start >= start or period.start == schedule.boundary(0)
    if period.start > schedule.boundary(0):
        before = period_containing(schedule, period.start - timedelta(microseconds=1))
        assert before.start < start <= period.start


@QUICK
@given(
    st.sampled_from(ZONES),
    st.integers(2000, 2040),
    st.integers(1, 12),
    st.sampled_from([28, 29, 30, 31]),
    st.integers(0, 23),
    st.integers(0, 1199),
    st.integers(1, 3),
)
def test_a_month_end_anchor_never_drifts_over_a_century(
    tz: str, year: int, month: int, day: int, hour: int, k: int, count: int
) -> None:
    """Boundary k of a monthly plan anchored on the 28th-31st, taken alone for any k up to a
    hundred years out, falls on the anchor's day clamped to that month's length, at the anchor's
    wall time (or just after a DST gap): it depends on the anchor only, never on the steps."""
    day = min(day, calendar.monthrange(year, month)[1])
    anchor = datetime(year, month, day, hour, tzinfo=ZoneInfo(tz)).astimezone(UTC)
    schedule = IntervalSchedule(Interval.MONTH, count, anchor, tz)
    start = wall(anchor, tz)
    months = start.year * 12 + start.month - 1 + k * count
    target_year, target_month = divmod(months, 12)
    target_month += 1
    target_day = min(start.day, calendar.monthrange(target_year, target_month)[1])
    want = start.replace(year=target_year, month=target_month, day=target_day)
    got = wall(schedule.boundary(k), tz)
    exists = wall(want.replace(tzinfo=ZoneInfo(tz)).astimezone(UTC), tz) == want
    if exists:
        assert got == want
    else:  # in a DST gap (or Apia's lost day): the first instant after it
        assert want < got <= want + timedelta(days=1, hours=2)
        assert wall(schedule.boundary(k) - timedelta(seconds=1), tz) < want


@SLOW
@given(cron_schedules(), instants, instants)
def test_cron_fires_are_monotone(schedule: CronSchedule, one: datetime, two: datetime) -> None:
    """A later instant never has an earlier next fire; the next fire is strictly later, with no
    fire in between, and the last fire at or before an instant is not later."""
    early, late = sorted((one, two))
    following = schedule.fire_after(early)
    assert early < following <= schedule.fire_after(late)
    assert schedule.fire_at_or_before(following - timedelta(microseconds=1)) <= early
    last = schedule.fire_at_or_before(late)
    assert last <= late < schedule.fire_after(last)
    assert schedule.fire_at_or_before(early) <= last


@SLOW
@given(cron_schedules(), instants)
def test_cron_periods_hold_their_instant_and_chain(schedule: CronSchedule, at: datetime) -> None:
    period = period_containing(schedule, at)
    assert period.start <= at < period.end
    assert next_period(schedule, period) == period_containing(schedule, period.end)


# --- money -----------------------------------------------------------------------------------

CURRENCIES = sorted(list_currencies())  # every code Babel knows, dead ones included
minor_units = st.integers(-(10**18), 10**18) | st.sampled_from([0, 1, -1, 5, 50, 99, 100, 999])


@QUICK
@given(minor_units, st.sampled_from(CURRENCIES))
def test_minor_units_round_trip_with_exactly_the_currencys_decimals(minor: int, code: str) -> None:
    amount = from_minor(minor, code)
    assert amount.as_tuple().exponent == -currency_exponent(code)
    assert to_minor(amount, code) == minor
    assert quantize(amount, code) == amount


@QUICK
@given(st.integers(1, 10**18), st.sampled_from(CURRENCIES))
def test_an_amount_written_out_parses_back_and_one_decimal_more_is_refused(
    minor: int, code: str
) -> None:
    amount = from_minor(minor, code)
    text = format(amount, "f")
    assert parse_amount(text, code) == amount
    longer = text + ("5" if "." in text else ".5")
    with pytest.raises(ValueError, match="decimal"):
        parse_amount(longer, code)  # refused, never rounded


def _digits(text: str) -> str:
    """The decimal digits of a text, whatever the script (Latin, Arabic-Indic...)."""
    return "".join(
        str(unicodedata.decimal(ch)) for ch in text if unicodedata.decimal(ch, None) is not None
    )


@QUICK
@given(
    minor_units,
    st.sampled_from(["QAR", "KWD", "BHD", "IQD", "JPY", "SAR", "OMR", "JOD", "EGP", "CLF", "USD"]),
    st.sampled_from(["en", "ar", "ar_QA", "fr", "de_CH", "hi_IN"]),
)
def test_formatting_shows_every_digit_of_the_amount_and_its_sign(
    minor: int, code: str, locale: str
) -> None:
    """A formatted amount shows the amount's digits, exactly the currency's decimals (trailing
    zeros included), whatever the locale's digits, grouping and symbol; negatives say so."""
    amount = from_minor(minor, code)
    text = format_money(amount, code, locale)
    assert _digits(text) == _digits(format(abs(amount), "f"))
    if minor < 0:
        assert any(sign in text for sign in "-\u2212\u200e\u061c"), text


# --- the answer table ------------------------------------------------------------------------

ORDER = "S7-20260131090000-1"
AMOUNT = Decimal("50.00")
KEY = "K3Y-5ecret-0000-1111-2222"
TOKEN = "Ab+/Cd|Ef\\12"

WORDS = ["SUCCESS", "success", "PENDING", "FAILURE", "ERROR", "DECLINED", "PROCESSING", "", " "]
TEXTS = [
    "Insufficient Funds",
    "Card token expired",
    "Invalid API Key",
    "Merchant token expired",
    "Specified payment does not exists",
    "Route not found",
    "Do Not Honor",
    "Transaction Successful - Approved",
    "card does not support recurring payments",
]
scalars = st.none() | st.booleans() | st.integers(-(10**6), 10**6) | st.text(max_size=12)
values = st.recursive(
    scalars | st.sampled_from(WORDS + TEXTS),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
amounts = (
    st.sampled_from(["50.00", "50", "50.01", "5000", "-50.00", "NaN", "fifty"]).map(
        lambda a: Decimal(a) if a not in ("NaN", "fifty") else a
    )
    | values
)
results = st.fixed_dictionaries(
    {},
    optional={
        "order_id": st.sampled_from([ORDER, ORDER + "0", "", 12345]) | values,
        "transaction_id": st.sampled_from(["T-7", 7]) | values,
        "payment_status": st.sampled_from(WORDS) | values,
        "amount": amounts,
        "currency": st.sampled_from(["QAR", "qar", "KWD", ""]) | values,
        "mode": st.sampled_from(["live", "LIVE", "test", "sandbox"]) | values,
        "description": st.sampled_from(TEXTS) | values,
        "card_details": st.none() | st.fixed_dictionaries({"last_4_digits": scalars}),
    },
)
envelopes = st.fixed_dictionaries(
    {},
    optional={
        "status": st.sampled_from(WORDS) | values,
        "result": results | values,
        "error": st.sampled_from(TEXTS)
        | st.fixed_dictionaries(
            {}, optional={"error_code": scalars, "description": st.sampled_from(TEXTS) | scalars}
        )
        | values,
    },
)


def _encode(document: Any) -> bytes:
    return json.dumps(document, default=str).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Fatora-like JSON, whole or cut short, or any bytes at all."""
    kind = draw(st.sampled_from(["envelope", "cut", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return _encode(draw(values))
    body = _encode(draw(envelopes))
    if kind == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    return body


statuses = st.integers(100, 999) | st.sampled_from([200, 201, 204, 302, 400, 402, 404, 422, 500])


def _client(status: int, body: bytes) -> FatoraClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, content=body))
    return FatoraClient("https://api.fatora.io/v1", KEY, mode="live", transport=transport, cap=None)


@QUICK
@given(
    st.sampled_from(list(Call)),
    st.integers(0, 999),
    st.none() | st.sampled_from(WORDS) | st.text(max_size=12),
    st.text(max_size=80) | st.sampled_from(TEXTS),
    st.none() | st.sampled_from(WORDS) | st.text(max_size=12),
    st.booleans(),
)
def test_classify_is_total(
    call: Call,
    status: int,
    word: str | None,
    text: str,
    payment_word: str | None,
    looks_like_json: bool,
) -> None:
    """Every status, envelope word, text and payment word gives a class the table has a
    verdict for."""
    answer = classify(
        call,
        status,
        envelope_word=word,
        text=text,
        payment_word=payment_word,
        looks_like_json=looks_like_json,
    )
    assert (call, answer) in VERDICTS


def _envelope_word(body: bytes) -> str | None:
    """The status word of a JSON envelope, read apart from the client's parser."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if isinstance(document, dict) and isinstance(document.get("status"), str):
        return str(document["status"]).strip().upper()
    return None


@QUICK
@given(statuses, bodies())
def test_a_collect_answer_is_a_result_or_a_classed_error_and_no_money_only_when_said(
    status: int, body: bytes
) -> None:
    """Through the real client, whatever comes back: a result, or a FatoraError the table has a
    verdict for, read as 'no money moved' only from Fatora's envelope (or a refused key)."""
    with _client(status, body) as client:
        try:
            client.collect_payment(TOKEN, ORDER, AMOUNT, "QAR")
        except FatoraError as exc:
            if verdict(Call.COLLECT, exc.answer).money is Money.NO:
                assert status in (401, 403) or _envelope_word(body) is not None, exc.answer


@QUICK
@given(statuses, bodies())
def test_a_verify_answer_is_a_result_or_a_classed_error_and_paid_only_when_confirmed(
    status: int, body: bytes
) -> None:
    """Through the real client: verify ends in a result or a FatoraError, and its result is
    paid only when the body itself confirms order id, amount, currency and the live mode."""
    with _client(status, body) as client:
        try:
            payment = client.verify(ORDER)
        except FatoraError as exc:
            assert (Call.VERIFY, exc.answer) in VERDICTS
            return
    paid = (
        payment.status is PaymentStatus.SUCCESS
        and payment.order_named
        and (payment_mismatch(Expected(ORDER, AMOUNT, "QAR", True), payment) is None)
    )
    if paid:
        # The parser fills a missing order id in from the request (reported): compare with it.
        document = json.loads(body)
        if isinstance(document.get("result"), dict):
            document["result"].setdefault("order_id", ORDER)
        assert confirms(_encode(document), order_id=ORDER, amount=AMOUNT, currency="QAR"), body


# --- the return page's query string ----------------------------------------------------------

# What a card token is made of (base64 and the separators Fatora's tokens carry), with the
# characters a query string cannot carry raw left to the percent-encoded form.
RAW_SAFE = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/\\|=-_.~:@!$'()*,;"
tokens = st.text(alphabet=RAW_SAFE, min_size=1, max_size=64)
any_tokens = st.text(
    alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=64
)


def _returned(query: bytes) -> list[str]:
    """The query strings that reach the return page's logic when a customer comes back with
    ``query``, through the real web app (ASGI); the logic itself is replaced by a recorder."""
    seen: list[str] = []

    def settle_return(rt: Runtime, ref: str, query: str) -> paylink.Page:
        seen.append(query)
        return paylink.Page("pending")

    app = create_app(runtime=lambda: cast(Runtime, None))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "https",
        "path": "/return/12-abc",
        "raw_path": b"/return/12-abc",
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"billing.example")],
        "client": ("203.0.113.9", 4242),
        "server": ("billing.example", 443),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(paylink, "settle_return", settle_return)
        asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 200
    return seen


@QUICK
@given(tokens, st.sampled_from(["token", "card_token", "cardToken", "CARDTOKEN"]))
def test_a_raw_token_survives_the_return_page_byte_for_byte(token: str, key: str) -> None:
    query = f"orderId={ORDER}&transId=T-7&{key}={token}&mode=live"
    (received,) = _returned(query.encode("ascii"))
    redirect = parse_redirect_params(received)
    assert redirect.card_token == token
    assert (redirect.order_id, redirect.transaction_id, redirect.mode) == (ORDER, "T-7", "live")


@QUICK
@given(any_tokens)
def test_a_percent_encoded_token_survives_the_return_page_byte_for_byte(token: str) -> None:
    (received,) = _returned(f"token={quote(token, safe='')}&orderId={ORDER}".encode("ascii"))
    assert parse_redirect_params(received).card_token == token


@QUICK
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_form_encoded_free_text_survives(order_id: str, description: str) -> None:
    """Order ids and failure descriptions in form encoding ("+" for a space) come back whole."""
    assume(order_id.strip() == order_id)
    query = f"order_id={quote_plus(order_id)}&Failerdescription={quote_plus(description)}"
    redirect = parse_redirect_params(query)
    assert (redirect.order_id, redirect.failure_description) == (order_id, description)


@QUICK
@given(tokens, st.text(alphabet="abcdefgh ?", min_size=1, max_size=20).filter(lambda t: "?" in t))
def test_a_raw_question_mark_in_a_value_loses_nothing(token: str, words: str) -> None:
    query = f"orderId={ORDER}&Failerdescription={words.replace(' ', '+')}&token={token}"
    redirect = parse_redirect_params(_returned(query.encode("ascii"))[0])
    assert (redirect.order_id, redirect.card_token) == (ORDER, token)


@QUICK
@given(st.binary(max_size=300))
def test_any_query_string_is_parsed_or_refused_with_a_value_error(query: bytes) -> None:
    """Whatever bytes a browser (or a forger) puts after the '?', the return page's parsing
    either reads them or raises the ValueError that settle_return turns into 'not paid here'."""
    (received,) = _returned(query)
    assert received == query.decode("latin-1")
    try:
        redirect = parse_redirect_params(received)
    except ValueError:
        return
    for value in (redirect.order_id, redirect.transaction_id, redirect.card_token):
        assert value is None or (isinstance(value, str) and value != "")
