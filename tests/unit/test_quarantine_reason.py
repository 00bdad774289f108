"""What a quarantined row says about its failure: enough for a human, never a secret."""

from __future__ import annotations

from sqlalchemy.exc import DataError, IntegrityError, OperationalError, ProgrammingError

from billing.fatora.sandbox import Sandbox
from billing.services.quarantine import REASON_MAX, reason_for, systemic


def test_the_reason_is_the_class_and_the_first_line_of_the_message() -> None:
    """The class names the kind of fault; the first line says which row's data is wrong."""
    exc = ValueError("unknown time zone 'US/Pacific-New'\nsecond line with detail")
    assert reason_for(exc) == "ValueError: unknown time zone 'US/Pacific-New'"
    assert reason_for(KeyError()) == "KeyError"


def test_the_reason_never_carries_a_token_or_a_key() -> None:
    """A card token or a Fernet key that found its way into a message is cut out; names of
    constraints and tables (long, but without digits) are kept."""
    token = Sandbox().issue_token("success")
    key = "q0kXoJ3yH1m8n5T2Wc4vB7aZ9dE6fG0hI3jK5lM8nP4="
    reason = reason_for(RuntimeError(f"bad card {token} with key {key}"))
    assert token not in reason and key not in reason
    for piece in (token[:10], key[:10]):
        assert piece not in reason
    assert reason.startswith("RuntimeError: bad card ")
    kept = reason_for(RuntimeError('violates "uq_charge_attempts_one_unresolved"'))
    assert "uq_charge_attempts_one_unresolved" in kept


def test_the_reason_fits_its_column() -> None:
    assert len(reason_for(RuntimeError("x " * 500))) == REASON_MAX


def test_a_database_error_gives_the_drivers_message_not_the_statement() -> None:
    """The statement and its parameters (a ciphertext, a token) never reach the reason."""
    orig = Exception('null value in column "currency" violates not-null constraint\nDETAIL: row')
    exc = IntegrityError("INSERT INTO invoices ...", {"token": "Zk9+abc/DEF|1"}, orig)
    assert reason_for(exc) == (
        'IntegrityError: null value in column "currency" violates not-null constraint'
    )


def test_only_a_fault_of_the_database_itself_is_systemic() -> None:
    """A lost connection or a missing column stops the pass; bad data in one row does not."""
    orig = Exception("boom")
    assert systemic(OperationalError("SELECT 1", {}, orig))
    assert systemic(ProgrammingError("SELECT 1", {}, orig))
    assert not systemic(IntegrityError("INSERT", {}, orig))
    assert not systemic(DataError("INSERT", {}, orig))
    assert not systemic(ValueError("unknown time zone"))
