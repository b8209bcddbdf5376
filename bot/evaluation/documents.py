"""Document cases for /extract: receipts, invoices, a menu and a form with known fields.

Amounts are computed, not typed: the seed picks items and quantities, the totals follow from them,
so the labels are always consistent with what is printed.
"""

from __future__ import annotations

import random
from datetime import date, timedelta

from bot.evaluation.canvas import Drawn, Page

CAFE_ITEMS = (("Espresso", 2.5), ("Cappuccino", 3.4), ("Croissant", 2.2), ("Orange juice", 4.5),
              ("Bagel", 3.1), ("Muffin", 2.8), ("Green tea", 2.9))
SHOP_ITEMS = (("USB-C cable", 12.99), ("Notebook A5", 4.5), ("AA batteries 4x", 6.25),
              ("Desk lamp", 29.0), ("Sticky notes", 3.75))
ZH_ITEMS = (("牛肉面", 28.0), ("小笼包", 18.0), ("炒青菜", 16.0), ("酸梅汤", 8.0), ("米饭", 3.0))


def _day(rng: random.Random) -> date:
    return date(2024, 1, 1) + timedelta(days=rng.randrange(365))


def _money(value: float) -> str:
    return f"{value:,.2f}"


def receipt(rng: random.Random, *, merchant: str, address: str, catalogue: tuple[tuple[str, float], ...],
            currency: str, symbol: str, tax_rate: float, face: str, labels: dict[str, str],
            case_id: str, tags: list[str]) -> Drawn:
    page = Page(440, "#fbfaf5", margin=22)
    bold = "cjk" if face == "cjk" else f"{face}-bold" if face == "liberation-sans" else "sans-bold"
    day = _day(rng)
    page.text(merchant, bold, 24, "#222222", centre=True)
    page.text(address, face, 15, "#222222", centre=True)
    page.text(f"{day.isoformat()}  {rng.randint(8, 21):02d}:{rng.randint(0, 59):02d}", face, 15,
              "#222222")
    page.rule("#999999", 14)
    chosen = rng.sample(catalogue, 3)
    subtotal = 0.0
    for name, price in chosen:
        quantity = rng.randint(1, 3)
        line = round(price * quantity, 2)
        subtotal += line
        page.text(f"{quantity} x {name}", face, 15, "#222222", right=_money(line))
    subtotal = round(subtotal, 2)
    tax = round(subtotal * tax_rate, 2)
    total = round(subtotal + tax, 2)
    page.rule("#999999", 14)
    page.text(labels["subtotal"], face, 15, "#222222", right=_money(subtotal))
    page.text(f"{labels['tax']} {round(tax_rate * 100)}%", face, 15, "#222222", right=_money(tax))
    page.text(f"{labels['total']} {currency}", bold, 18, "#111111", right=f"{symbol}{_money(total)}")
    fields = {"document_type": "receipt", "merchant": merchant, "date": day.isoformat(),
              "subtotal": subtotal, "tax": tax, "total": total, "currency": currency}
    return Drawn(case_id, "extract", page.finish(), page.lines, fields=fields,
                 items=[name for name, _ in chosen], tags=tags)


def invoice(rng: random.Random, *, seller: str, face: str, case_id: str) -> Drawn:
    page = Page(820, "#ffffff", margin=36)
    bold = f"{face}-bold" if face == "liberation-sans" else face
    number = f"INV-{rng.randint(2024000, 2024999)}"
    issued = _day(rng)
    due = issued + timedelta(days=30)
    buyer = rng.choice(("Northwind Traders Ltd", "Blue Harbor GmbH", "Kestrel Labs Inc"))
    page.text(f"INVOICE {number}", bold, 30, "#111827")
    page.text(f"From: {seller}", face, 17, "#111827")
    page.text(f"Bill to: {buyer}", face, 17, "#111827")
    page.text(f"Issue date: {issued.isoformat()}   Due date: {due.isoformat()}", face, 17, "#111827")
    page.rule("#9ca3af", 18)
    chosen = rng.sample(SHOP_ITEMS, 3)
    subtotal = 0.0
    for name, price in chosen:
        quantity = rng.randint(1, 5)
        line = round(price * quantity, 2)
        subtotal += line
        page.text(f"{name}  {quantity} x {_money(price)}", face, 17, "#1f2937", right=_money(line))
    subtotal = round(subtotal, 2)
    tax = round(subtotal * 0.2, 2)
    total = round(subtotal + tax, 2)
    page.rule("#9ca3af", 18)
    page.text("Subtotal", face, 17, "#111827", right=_money(subtotal))
    page.text("VAT 20%", face, 17, "#111827", right=_money(tax))
    page.text("Total due (GBP)", bold, 20, "#111827", right=f"£{_money(total)}")
    page.text("Payment terms: 30 days", face, 15, "#4b5563")
    fields = {"document_type": "invoice", "invoice_number": number, "seller": seller,
              "buyer": buyer, "issue_date": issued.isoformat(), "due_date": due.isoformat(),
              "subtotal": subtotal, "tax": tax, "total": total, "currency": "GBP"}
    return Drawn(case_id, "extract", page.finish(), page.lines, fields=fields,
                 items=[name for name, _ in chosen], tags=["invoice"])


def menu(rng: random.Random) -> Drawn:
    page = Page(620, "#fff7ed", margin=34)
    page.text("Trattoria Lucia", "serif", 34, "#7c2d12", centre=True)
    page.text("Pasta", "serif", 22, "#9a3412")
    dishes = [("Spaghetti carbonara", 14), ("Penne arrabbiata", 12), ("Lasagne al forno", 15)]
    dishes += [("Tiramisu", 7), ("Panna cotta", 6)]
    prices = {name: price + rng.choice((0, 0.5, 1)) for name, price in dishes}
    for name, _ in dishes[:3]:
        page.text(name, "serif", 18, "#1c1917", right=f"{prices[name]:.2f} €")
    page.skip(10)
    page.text("Dolci", "serif", 22, "#9a3412")
    for name, _ in dishes[3:]:
        page.text(name, "serif", 18, "#1c1917", right=f"{prices[name]:.2f} €")
    fields = {"document_type": "menu", "restaurant": "Trattoria Lucia", "currency": "EUR"}
    return Drawn("extract-menu", "extract", page.finish(), page.lines, fields=fields,
                 items=[name for name, _ in dishes], tags=["menu"])


def form(rng: random.Random) -> Drawn:
    page = Page(700, "#ffffff", margin=30)
    values = {"Full name": rng.choice(("Anna Berg", "Liam Chen", "Sofia Rossi")),
              "Date of birth": _day(rng).replace(year=1990).isoformat(),
              "City": rng.choice(("Lisbon", "Oslo", "Dublin")),
              "Membership": rng.choice(("Gold", "Silver"))}
    page.text("Library Membership Application", "liberation-sans-bold", 24, "#111111")
    page.rule("#cccccc", 16)
    for label, value in values.items():
        page.text(f"{label}: {value}", "liberation-sans", 18, "#222222")
        page.draw.line((page.margin, page.y - 6, page.width - page.margin, page.y - 6),
                       fill="#e5e7eb")
    fields: dict[str, object] = {"document_type": "form", "title": "Library Membership Application"}
    fields.update({f"field:{label}": value for label, value in values.items()})
    return Drawn("extract-form", "extract", page.finish(), page.lines, fields=fields,
                 tags=["form"])


def extract_cases(rng: random.Random) -> list[Drawn]:
    english = {"subtotal": "SUBTOTAL", "tax": "VAT", "total": "TOTAL"}
    return [
        receipt(rng, merchant="CAFE AURORA", address="12 Harbour Street, Lisbon",
                catalogue=CAFE_ITEMS, currency="EUR", symbol="€", tax_rate=0.1, face="sans",
                labels=english, case_id="extract-receipt-eur", tags=["receipt"]),
        receipt(rng, merchant="CORNER MART", address="480 Market St, San Francisco",
                catalogue=SHOP_ITEMS, currency="USD", symbol="$", tax_rate=0.0875,
                face="liberation-sans", labels={**english, "tax": "Sales tax"},
                case_id="extract-receipt-usd", tags=["receipt"]),
        receipt(rng, merchant="老北京面馆", address="上海市南京东路 88 号", catalogue=ZH_ITEMS,
                currency="CNY", symbol="¥", tax_rate=0.06, face="cjk",
                labels={"subtotal": "小计", "tax": "税", "total": "合计"},
                case_id="extract-receipt-cny-zh", tags=["receipt", "zh"]),
        invoice(rng, seller="Brightline Supplies Ltd", face="liberation-sans",
                case_id="extract-invoice-sans"),
        invoice(rng, seller="Oakridge Office Co", face="serif", case_id="extract-invoice-serif"),
        menu(rng),
        form(rng),
    ]
