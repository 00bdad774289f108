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
from collections.abc import Mapping, Sequence

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from billing.config import get_settings


class TokenKeyMissing(RuntimeError):
    """No usable BILLING_TOKEN_KEY is configured."""


class TokenUnreadable(RuntimeError):
    """A stored token cannot be decrypted with any configured key."""


# How an operator gets rid of a card whose token no configured key decrypts.
REMOVE_UNREADABLE = "billing cards remove {card_id} --local-only"


class TokensUnreadable(TokenUnreadable):
    """Some stored tokens cannot be decrypted with any configured key: their cards' ids."""

    def __init__(self, card_ids: Sequence[int]) -> None:
        self.card_ids = sorted(card_ids)
        first = self.card_ids[0]
        listed = ", ".join(str(i) for i in self.card_ids[:10])
        more = f" and {len(self.card_ids) - 10} more" if len(self.card_ids) > 10 else ""
        remove = REMOVE_UNREADABLE.format(card_id=first)
        if len(self.card_ids) == 1:
            what = f"the token of card {first} cannot be decrypted"
            fix = f"add the key it was encrypted with, or remove the card (`{remove}`)"
        else:
            what = f"the tokens of cards {listed}{more} cannot be decrypted"
            fix = f"add the keys they were encrypted with, or remove the cards (`{remove}`, ...)"
        super().__init__(
            f"{what} with any key in BILLING_TOKEN_KEY, so nothing was re-encrypted: {fix}"
        )


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
        try:
            return self._multi.rotate(ciphertext)
        except InvalidToken:
            raise TokenUnreadable(
                "a stored card token cannot be decrypted with the configured keys"
            ) from None

    def rotate_all(self, ciphertexts: Mapping[int, bytes]) -> dict[int, tuple[bytes, str]]:
        """Each card's token re-encrypted with the primary key, and its fingerprint under it.

        All or nothing: if any token cannot be decrypted, ``TokensUnreadable`` names every
        such card and nothing is returned.
        """
        done: dict[int, tuple[bytes, str]] = {}
        unreadable: list[int] = []
        for card_id, ciphertext in ciphertexts.items():
            try:
                token = self.decrypt(ciphertext)
            except TokenUnreadable:
                unreadable.append(card_id)
                continue
            done[card_id] = (self.rotate(ciphertext), self.fingerprint(token))
        if unreadable:
            raise TokensUnreadable(unreadable)
        return done

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
