"""The simulated card processor: a pure, deterministic decision per card number and amount.

    decide("4242 4242 4242 4242", 1999)  # Decision(approved=True, reason=None, last4="4242")
    decide("4000000000000002", 1999)     # declined: "card declined"
    decide("4000000000009995", 1999)     # declined: "insufficient funds"
    decide("4242424242424241", 1999)     # declined: "invalid card number" (fails the Luhn check)
    decide("4242424242424242", 1_000_001)  # declined: "amount over limit"

Spaces and dashes in the number are ignored; anything else that is not 16 digits is invalid.
Only the last four digits leave this module.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AMOUNT_LIMIT_CENTS", "DECLINING_CARDS", "Decision", "decide", "luhn_valid"]

AMOUNT_LIMIT_CENTS = 1_000_000
DECLINING_CARDS = {
    "4000000000000002": "card declined",
    "4000000000009995": "insufficient funds",
}


@dataclass(frozen=True, slots=True)
class Decision:
    approved: bool
    reason: str | None
    last4: str | None


def luhn_valid(digits: str) -> bool:
    """The Luhn (mod 10) check of a string of digits."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def decide(card_number: str, amount_cents: int) -> Decision:
    """Approve or decline `amount_cents` on `card_number`."""
    digits = card_number.replace(" ", "").replace("-", "")
    if not (len(digits) == 16 and digits.isascii() and digits.isdigit()):
        return Decision(False, "invalid card number", None)
    last4 = digits[-4:]
    if not luhn_valid(digits):
        return Decision(False, "invalid card number", last4)
    if amount_cents > AMOUNT_LIMIT_CENTS:
        return Decision(False, "amount over limit", last4)
    if digits in DECLINING_CARDS:
        return Decision(False, DECLINING_CARDS[digits], last4)
    return Decision(True, None, last4)
