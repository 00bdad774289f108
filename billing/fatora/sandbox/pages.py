"""HTML for the sandbox's hosted checkout page, in English and Arabic."""

from __future__ import annotations

from html import escape

_TEXT: dict[str, dict[str, str]] = {
    "en": {
        "title": "Fatora sandbox checkout",
        "pay": "Pay",
        "amount": "Amount",
        "order": "Order",
        "card_number": "Card number",
        "expiry": "Expiry (MM/YY)",
        "cvv": "CVV",
        "name": "Name on card",
        "done": "This payment has already been processed.",
        "not_found": "Payment not found.",
        "success": "Payment successful.",
        "failure": "Payment failed.",
    },
    "ar": {
        "title": "صفحة الدفع التجريبية - فاتورة",
        "pay": "ادفع",
        "amount": "المبلغ",
        "order": "الطلب",
        "card_number": "رقم البطاقة",
        "expiry": "تاريخ الانتهاء (شهر/سنة)",
        "cvv": "رمز التحقق",
        "name": "الاسم على البطاقة",
        "done": "تمت معالجة هذه الدفعة مسبقاً.",
        "not_found": "الدفعة غير موجودة.",
        "success": "تمت عملية الدفع بنجاح.",
        "failure": "فشلت عملية الدفع.",
    },
}


def text(language: str, key: str) -> str:
    """One UI string in ``language`` (English when the language is unknown)."""
    return _TEXT.get(language, _TEXT["en"])[key]


def _page(language: str, body: str) -> str:
    direction = "rtl" if language == "ar" else "ltr"
    lang = language if language in _TEXT else "en"
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}" dir="{direction}">\n<head>'
        f'<meta charset="utf-8"><title>{escape(text(lang, "title"))}</title></head>\n'
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def checkout_form(
    *,
    language: str,
    action: str,
    payment_id: str,
    order_id: str,
    amount: str,
    currency: str,
    error: str | None = None,
) -> str:
    """The card form for one checkout session."""
    t = _TEXT.get(language, _TEXT["en"])
    error_html = f'<p class="error" role="alert">{escape(error)}</p>\n' if error else ""
    body = (
        f"<h1>{escape(t['title'])}</h1>\n"
        f'<p>{escape(t["order"])}: <span id="order-id">{escape(order_id)}</span></p>\n'
        f"<p>{escape(t['amount'])}: "
        f'<span id="amount">{escape(amount)} {escape(currency)}</span></p>\n'
        f"{error_html}"
        f'<form method="post" action="{escape(action)}">\n'
        f'<input type="hidden" name="paymentID" value="{escape(payment_id)}">\n'
        f'<label>{escape(t["card_number"])} <input name="card_number" inputmode="numeric" '
        f'autocomplete="cc-number" required></label>\n'
        f'<label>{escape(t["expiry"])} <input name="expiry" placeholder="MM/YY" '
        f'autocomplete="cc-exp" required></label>\n'
        f'<label>{escape(t["cvv"])} <input name="cvv" inputmode="numeric" '
        f'autocomplete="cc-csc" required></label>\n'
        f'<label>{escape(t["name"])} <input name="name" autocomplete="cc-name"></label>\n'
        f'<button type="submit">{escape(t["pay"])}</button>\n'
        "</form>"
    )
    return _page(language, body)


def message(language: str, key: str, detail: str = "") -> str:
    """A page with one message (already processed, not found, result pages)."""
    extra = f"\n<p>{escape(detail)}</p>" if detail else ""
    return _page(language, f"<h1>{escape(text(language, key))}</h1>{extra}")
