"""``billing demo`` leaves no secret in clear behind it: no card token the embedded sandbox
issued, no API key, no token key, in anything the demo wrote (its log, its SQLite database read
table by table and as a file, its reports) or printed on the screen.

The demo makes its secrets itself: a fresh token key, and cards the sandbox in its own process
issues. The demo is run as ``billing demo`` is (``python -m billing.cli demo``, in a folder of
its own), with two public functions wrapped so that what they hand out is also written to a file
outside that folder: ``billing.crypto.new_key`` (the token key) and the sandbox's
``issue_token`` and ``pay`` (a token issued, or saved at a checkout and sent back in the
redirect; with the API key the sandbox accepts). Nothing else about the run changes. The
database then proves the record complete: every stored ciphertext decrypts, with the recorded
key, to a recorded token.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from bench.secret_scan import Secrets, scan_database, scan_files, scan_text
from billing.crypto import TokenVault
from billing.demo import CUSTOMERS

pytestmark = pytest.mark.e2e

# `billing demo`, with what brings a secret into being written to the file named by argv[1].
OBSERVED_DEMO = """
import json
import runpy
import sys
from urllib.parse import parse_qs, urlsplit

import billing.crypto
from billing.fatora.sandbox import Sandbox

record = open(sys.argv[1], "a", encoding="utf-8")


def note(kind, value):
    record.write(json.dumps([kind, value]) + "\\n")
    record.flush()


def observed(make, kind):
    def wrapper(*args, **kwargs):
        value = make(*args, **kwargs)
        note(kind, value)
        return value

    return wrapper


def issue_token(self, *args, **kwargs):
    note("API key", self.api_key)
    return observed(issue, "card token")(self, *args, **kwargs)


def pay(self, *args, **kwargs):
    note("API key", self.api_key)
    redirect = paid(self, *args, **kwargs)
    for token in parse_qs(urlsplit(redirect).query).get("card_token", []):
        note("card token", token)
    return redirect


issue, paid = Sandbox.issue_token, Sandbox.pay
Sandbox.issue_token, Sandbox.pay = issue_token, pay
billing.crypto.new_key = observed(billing.crypto.new_key, "token key")
sys.argv = ["billing", "demo"]
runpy.run_module("billing.cli", run_name="__main__", alter_sys=True)
"""

KINDS = ("card token", "API key", "token key")


def _run_observed_demo(folder: Path, record: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120"}
    env.pop("FATORA_API_KEY", None)  # the embedded sandbox takes its own key only
    return subprocess.run(
        [sys.executable, "-c", OBSERVED_DEMO, str(record)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


def _recorded(record: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {kind: [] for kind in KINDS}
    for line in record.read_text("utf-8").splitlines():
        kind, value = json.loads(line)
        if value not in found[kind]:
            found[kind].append(value)
    return found


def _stored_tokens(database: Path, key: str) -> list[str]:
    db = sqlite3.connect(database)
    try:
        rows = db.execute("SELECT ciphertext FROM card_tokens").fetchall()
    finally:
        db.close()
    vault = TokenVault(key)
    return [vault.decrypt(ciphertext) for (ciphertext,) in rows]


def _plant(database: Path, column_value: str) -> None:
    db = sqlite3.connect(database)
    try:
        db.execute(
            "UPDATE customers SET name = ? WHERE id = (SELECT min(id) FROM customers)",
            (f"Amal {column_value}",),
        )
        db.commit()
    finally:
        db.close()


def test_the_demo_leaves_no_secret_in_clear(tmp_path: Path) -> None:
    folder, record = tmp_path / "run", tmp_path / "secrets.jsonl"
    folder.mkdir()
    done = _run_observed_demo(folder, record)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "charged twice: 0; taken but not recorded: 0" in done.stdout

    # The secrets the run made, and the proof that the record of them is whole.
    known = _recorded(record)
    assert len(known["token key"]) == 1, "the demo makes one token key"
    assert len(known["API key"]) == 1
    var = folder / "var"
    stored = _stored_tokens(var / "demo.sqlite3", known["token key"][0])
    assert len(stored) >= len(CUSTOMERS)
    assert set(stored) <= set(known["card token"]), "a stored token was not recorded"
    # The round trip's token is saved at a checkout and never stored.
    assert len(known["card token"]) > len(set(stored))
    secrets = Secrets(known)

    # Everything the demo wrote (the database as a file too), its database table by table,
    # and the screen.
    written = {path.name for path in var.iterdir()}
    assert {"demo.log", "demo.sqlite3", "report.html", "report.json"} <= written
    scan = scan_files(secrets, [folder], prefix="file")
    scan += scan_database(secrets, f"sqlite:///{var / 'demo.sqlite3'}")
    scan += scan_text(secrets, "standard output", done.stdout)
    scan += scan_text(secrets, "standard error", done.stderr)
    assert {f"file var/{name}" for name in written} <= set(scan.places)
    assert "table card_tokens.ciphertext" in scan.places
    assert scan.hits == [], scan.by_place()

    # The same scan sees a secret planted in the same places: a token in a customer's name,
    # the token key in the log, a token as JSON writes it in the report.
    planted = tmp_path / "planted"
    shutil.copytree(var, planted)
    token = known["card token"][0]
    _plant(planted / "demo.sqlite3", token)
    with (planted / "demo.log").open("a", encoding="utf-8") as log:
        log.write(f"a careless line: key={known['token key'][0]}\n")
    report = planted / "report.json"
    report.write_text(json.dumps({"card": token, **json.loads(report.read_text())}), "utf-8")
    caught = scan_files(secrets, [planted], prefix="file")
    caught += scan_database(secrets, f"sqlite:///{planted / 'demo.sqlite3'}")
    assert caught.by_place() == {
        "file demo.log": ["token key #1 (as is)"],
        "file demo.sqlite3": ["card token #1 (as is)"],
        "file report.json": ["card token #1 (JSON-escaped)"],
        "table customers.name": ["card token #1 (as is)"],
    }
