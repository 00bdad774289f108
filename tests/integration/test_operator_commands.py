"""The commands an operator uses to act on one customer, as a new user types them (PostgreSQL
and SQLite): customers show and update, cards list, set-default and remove, invoices show, and
a subscription started through the hosted page."""

from __future__ import annotations

import json

from tests.integration.test_cli import TOKEN, cli_env, run

__all__ = ["cli_env"]

PLANS = """
[plans.basic]
name = "Basic"
amount = "50.00"
currency = "QAR"
interval = "month"
"""


def _setup(tmp_path: object) -> None:
    from pathlib import Path

    plans = Path(str(tmp_path)) / "plans.toml"
    plans.write_text(PLANS)
    run("plans", "sync", str(plans))
    run("customers", "add", "--external-id", "c1", "--name", "Ali", "--email", "a@example.com")


def test_customer_show_and_update(cli_env: str, tmp_path: object) -> None:
    """Protects: an operator sees a customer's cards, subscriptions and unpaid invoices, and a
    changed address or language is stored (and reported) without touching anything else."""
    _setup(tmp_path)
    card = run("cards", "add", "--customer", "c1", "--token", "-", input=TOKEN + "\n").strip()
    sub = run("subscriptions", "create", "--customer", "c1", "--plan", "basic", "--card", card)
    shown = json.loads(run("customers", "show", "c1", "--json"))
    assert [c["id"] for c in shown["cards"]] == [int(card)]
    assert [s["id"] for s in shown["subscriptions"]] == [int(sub)]
    assert TOKEN not in json.dumps(shown) and shown["push"] is False
    changed = run("customers", "update", "c1", "--language", "ar", "--email", "b@example.com")
    assert "email" in changed and "language" in changed
    shown = json.loads(run("customers", "show", "c1", "--json"))
    assert (shown["email"], shown["language"], shown["name"]) == ("b@example.com", "ar", "Ali")
    assert "no change" in run("customers", "update", "c1", "--language", "ar")
    bad = run("customers", "update", "c1", "--language", "fr", ok=False)
    assert "en or ar" in bad and len(bad.strip().splitlines()) == 1


def test_cards_list_set_default_and_a_removal_that_needs_consent(
    cli_env: str, tmp_path: object
) -> None:
    """Protects: cards are listed without their tokens; a switch moves the subscription; a
    removal cannot happen by accident (no --yes, no terminal: refused, nothing changed)."""
    _setup(tmp_path)
    first = run("cards", "add", "--customer", "c1", "--token", "-", input=TOKEN + "\n").strip()
    second = run("cards", "add", "--customer", "c1", "--token", "-", input="Zz+9|8\n").strip()
    sub = run("subscriptions", "create", "--customer", "c1", "--plan", "basic", "--card", first)
    listed = json.loads(run("cards", "list", "--customer", "c1", "--json"))
    assert [c["id"] for c in listed] == [int(first), int(second)]
    assert TOKEN not in run("cards", "list")
    switched = run("cards", "set-default", second)
    assert f"subscription(s) {sub.strip()}" in switched
    assert json.loads(run("subscriptions", "show", sub.strip(), "--json"))["card_id"] == int(second)
    refused = run("cards", "remove", first, ok=False)
    assert "--yes" in refused and len(refused.strip().splitlines()) == 1
    assert all(c["status"] == "active" for c in json.loads(run("cards", "list", "--json")))


def test_a_subscription_started_by_link_and_its_invoice_story(
    cli_env: str, tmp_path: object
) -> None:
    """Protects: the first payment on the hosted page: the command prints the customer's link,
    the subscription waits unpaid with its first invoice open and nothing scheduled to charge
    it, and `invoices show` tells that invoice's story."""
    _setup(tmp_path)
    started = json.loads(
        run("subscriptions", "checkout-link", "--customer", "c1", "--plan", "basic", "--json")
    )
    assert started["status"] == "unpaid" and started["card_id"] is None
    assert f"/pay/{started['invoice_id']}-" in started["link"]
    story = json.loads(run("invoices", "show", str(started["invoice_id"]), "--json"))
    assert story["status"] == "open" and story["next_attempt_at"] is None
    assert story["subscription"]["id"] == started["id"] and story["attempts"] == []
    assert "invoice.created" in [e["kind"] for e in story["events"]]
    text = run("invoices", "show", str(started["invoice_id"]))
    assert f"invoice {started['invoice_id']}: 50.00 QAR open" in text
    missing = run("invoices", "show", "999999", ok=False)
    assert "no invoice 999999" in missing


def test_refund_needs_consent_and_a_paid_invoice(cli_env: str, tmp_path: object) -> None:
    """Protects: money is not sent back by accident (no --yes, no terminal: refused), and an
    invoice that was never paid is refused in one line that says why."""
    _setup(tmp_path)
    started = json.loads(
        run("subscriptions", "checkout-link", "--customer", "c1", "--plan", "basic", "--json")
    )
    invoice = str(started["invoice_id"])
    refused = run("refund", invoice, ok=False)
    assert "--yes" in refused and len(refused.strip().splitlines()) == 1
    unpaid = run("refund", invoice, "--yes", ok=False)
    assert "only a paid invoice can be refunded" in unpaid
    assert len(unpaid.strip().splitlines()) == 1
    assert json.loads(run("invoices", "show", invoice, "--json"))["refund"] is None
