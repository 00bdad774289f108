"""The return web app: the pay-and-update link, and the page Fatora sends the customer back to.

``billing web --host H --port P`` serves it; ``BILLING_PUBLIC_URL`` is its public base. Every
decision is in ``billing.services.paylink``; this module only turns its answers into pages, in
the customer's language (English, or Arabic right to left).
"""

from __future__ import annotations

from collections.abc import Callable
from html import escape

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from billing.runtime import Runtime, get_runtime
from billing.services import paylink

_TEXT: dict[str, dict[str, tuple[str, str]]] = {
    "en": {
        "paid": ("Thank you", "Your payment was received and your card is saved for renewals."),
        "pending": ("Almost there", "Your payment is being confirmed. You may close this page."),
        "failed": ("Payment not completed", "Your payment did not go through. You can try again."),
        "closed": ("Nothing to pay", "This invoice has nothing left to pay."),
        "expired": (
            "Link expired",
            "This link has expired. Please ask us for a new one to start your subscription.",
        ),
        "nothing_due": (
            "Nothing to pay yet",
            "There is no renewal to pay now. We will write to you before the next one.",
        ),
        "busy": (
            "Please wait",
            "A payment for this invoice is already being processed. Try again in a few minutes.",
        ),
        "unavailable": ("Not available now", "Payments are not available now. Try again later."),
        "invalid": ("Link not valid", "This link is not valid. Please use the link you received."),
        "again": ("", "Try again"),
    },
    "ar": {
        "paid": ("شكرًا لك", "تم استلام دفعتك وحفظ بطاقتك للتجديدات القادمة."),
        "pending": ("لحظات", "جارٍ تأكيد دفعتك. يمكنك إغلاق هذه الصفحة."),
        "failed": ("لم تكتمل الدفعة", "لم تتم عملية الدفع. يمكنك المحاولة مرة أخرى."),
        "closed": ("لا يوجد مبلغ مستحق", "لا يوجد مبلغ متبقٍ للدفع على هذه الفاتورة."),
        "expired": (
            "انتهت صلاحية الرابط",
            "انتهت صلاحية هذا الرابط. يرجى طلب رابط جديد لبدء اشتراكك.",
        ),
        "nothing_due": (
            "لا يوجد مبلغ مستحق الآن",
            "لا يوجد تجديد مستحق الدفع الآن. سنراسلك قبل التجديد القادم.",
        ),
        "busy": ("يرجى الانتظار", "هناك دفعة قيد المعالجة لهذه الفاتورة. حاول مجددًا بعد دقائق."),
        "unavailable": ("غير متاح حاليًا", "الدفع غير متاح حاليًا. حاول لاحقًا."),
        "invalid": ("رابط غير صالح", "هذا الرابط غير صالح. يرجى استخدام الرابط الذي وصلك."),
        "again": ("", "حاول مرة أخرى"),
    },
}
_STATUS = {"invalid": 400, "busy": 409, "unavailable": 503}


def render(page: paylink.Page) -> Response:
    if page.word == "redirect" and page.url:
        return RedirectResponse(page.url, status_code=303)
    language = page.language if page.language in _TEXT else "en"
    text = _TEXT[language]
    title, body = text.get(page.word, text["invalid"])
    direction = "rtl" if language == "ar" else "ltr"
    again = (
        f'<p><a href="{escape(page.link, quote=True)}">{escape(text["again"][1])}</a></p>'
        if page.link
        else ""
    )
    html = (
        f'<!doctype html><html lang="{language}" dir="{direction}"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title></head>"
        f'<body style="font-family:sans-serif;max-width:32em;margin:3em auto;padding:0 1em">'
        f"<h1>{escape(title)}</h1><p>{escape(body)}</p>{again}</body></html>"
    )
    return HTMLResponse(html, status_code=_STATUS.get(page.word, 200))


def create_app(runtime: Callable[[], Runtime] = get_runtime) -> Starlette:
    def pay(request: Request) -> Response:
        return render(paylink.open_checkout(runtime(), request.path_params["ref"]))

    def renew(request: Request) -> Response:
        return render(paylink.renew_ahead(runtime(), request.path_params["ref"]))

    def back(request: Request) -> Response:
        # The raw query string: a card token's "+" must not become a space.
        query = request.scope.get("query_string", b"").decode("latin-1")
        return render(paylink.settle_return(runtime(), request.path_params["ref"], query))

    def health(_request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/pay/{ref}", pay),
            Route("/renew/{ref}", renew),
            Route("/return/{ref}", back),
            Route("/health", health),
        ]
    )
