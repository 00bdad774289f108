"""Card tokens at rest: Fernet encryption with key rotation, and a keyed fingerprint for lookup.

``BILLING_TOKEN_KEY`` holds one or more Fernet keys separated by commas. The first encrypts new
tokens; all of them decrypt, so keys can be rotated without downtime (``billing keys rotate``
re-encrypts with the first). The fingerprint is an HMAC of the token under a key derived from
each Fernet key, so it reveals nothing without the key and survives rotation: lookups try the
fingerprint under every configured key.
"""

from __future__ import annotations

import hashlib
import hmac

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from billing.config import get_settings


class TokenKeyMissing(RuntimeError):
    """No usable BILLING_TOKEN_KEY is configured."""


class TokenUnreadable(RuntimeError):
    """A stored token cannot be decrypted with any configured key."""


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


class TokenVault:
    def __init__(self, keys: str) -> None:
        parts = [part.strip() for part in keys.split(",") if part.strip()]
        if not parts:
            raise TokenKeyMissing("BILLING_TOKEN_KEY is empty; create one with `billing keys new`")
        try:
            self._fernets = [Fernet(part.encode("ascii")) for part in parts]
        except (ValueError, UnicodeEncodeError):
            # The message names the variable, never the value.
            raise TokenKeyMissing(
                "BILLING_TOKEN_KEY holds a value that is not a Fernet key "
                "(32 url-safe base64 bytes); create one with `billing keys new`"
            ) from None
        self._multi = MultiFernet(self._fernets)
        self._mac_keys = [
            hashlib.sha256(b"fatora-billing/fingerprint/" + part.encode("ascii")).digest()
            for part in parts
        ]

    def __repr__(self) -> str:
        return f"TokenVault(keys={len(self._fernets)})"

    def encrypt(self, token: str) -> bytes:
        return self._multi.encrypt(token.encode("utf-8"))

    def decrypt(self, ciphertext: bytes) -> str:
        try:
            return self._multi.decrypt(ciphertext).decode("utf-8")
        except InvalidToken:
            raise TokenUnreadable(
                "a stored card token cannot be decrypted with the configured keys"
            ) from None

    def rotate(self, ciphertext: bytes) -> bytes:
        return self._multi.rotate(ciphertext)

    def fingerprint(self, token: str) -> str:
        """The fingerprint under the primary key: what new rows store."""
        return self._mac(self._mac_keys[0], token)

    def fingerprints(self, token: str) -> list[str]:
        """The fingerprint under every configured key, for lookups across a rotation."""
        return [self._mac(key, token) for key in self._mac_keys]

    @staticmethod
    def _mac(key: bytes, token: str) -> str:
        return hmac.new(key, token.encode("utf-8"), hashlib.sha256).hexdigest()


def vault_from_settings() -> TokenVault:
    key = get_settings().token_key
    if key is None:
        raise TokenKeyMissing("BILLING_TOKEN_KEY is not set; create one with `billing keys new`")
    return TokenVault(key.get_secret_value())
