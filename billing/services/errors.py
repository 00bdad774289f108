"""Errors a use case reports to its caller: one clear line each, no traceback for the user."""

from __future__ import annotations


class BillingError(Exception):
    """A request that cannot be carried out, with a message fit for the command line."""


class NotFound(BillingError):
    pass


class Conflict(BillingError):
    pass
