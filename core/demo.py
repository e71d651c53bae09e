"""The demo: a synthetic task a tiny random-init model can learn in seconds on a CPU.

The task is field extraction: a sentence about an order becomes a JSON object. A base
model that was never trained answers gibberish; an adapter trained on a few hundred
examples answers in the exact format, which makes the effect of tuning visible.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

FIRST = ["Maria", "John", "Aiko", "Omar", "Lena", "Carlos", "Priya", "Tom", "Sara", "Ivan", "Nora", "Ben"]
LAST = [
    "Lopez",
    "Smith",
    "Tanaka",
    "Haddad",
    "Berg",
    "Silva",
    "Patel",
    "Brown",
    "Costa",
    "Novak",
    "Kim",
    "Reed",
]
CITIES = [
    "Lisbon",
    "Paris",
    "Osaka",
    "Cairo",
    "Oslo",
    "Lima",
    "Delhi",
    "Leeds",
    "Porto",
    "Prague",
    "Seoul",
    "Austin",
]
TEMPLATES = [
    "{name} from {city} paid {amount} for the order.",
    "Order paid by {name} ({city}): {amount}.",
    "{name} in {city} sent a payment of {amount}.",
    "Payment of {amount} received from {name}, {city}.",
    "{city} customer {name} was charged {amount}.",
]
SYSTEM = "Extract name, city and amount as JSON."


def demo_record(rng: random.Random) -> dict[str, Any]:
    name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    city = rng.choice(CITIES)
    amount = round(rng.uniform(1, 500), rng.choice([0, 2]))
    amount_text = f"{amount:.2f}" if amount != int(amount) else str(int(amount))
    sentence = rng.choice(TEMPLATES).format(name=name, city=city, amount=amount_text)
    answer = json.dumps({"name": name, "city": city, "amount": float(amount_text)})
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": sentence},
            {"role": "assistant", "content": answer},
        ]
    }


def write_demo_dataset(path: str | Path, n: int = 600, seed: int = 0) -> Path:
    """Write ``n`` distinct demo examples as chat JSONL."""
    rng = random.Random(seed)
    seen: set[str] = set()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        while len(seen) < n:
            record = demo_record(rng)
            line = json.dumps(record)
            if line not in seen:
                seen.add(line)
                fh.write(line + "\n")
    return path
