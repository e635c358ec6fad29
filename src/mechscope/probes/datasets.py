"""Built-in labelled datasets for probes, written by the project (templates + word lists, no download).

    ds = datasets.load("cities")                 # LabelledDataset(texts, labels, name, split="train")
    test = datasets.load("cities", split="test")  # the held-out split
    datasets.names()                             # cities, arithmetic, isa, truefalse, sentiment

Label 1 = true / positive, 0 = false / negative. Every true statement has a false twin built from the
same subject (a wrong country, a wrong sum, a wrong category), so a probe cannot separate the classes by
subject or template; only the truth (or the sentiment word) differs.

Why the split is by *item* (a city, an (a, b) pair, an object, a sentiment word): a probe that memorised
"Paris" must not be credited on a held-out "Paris" statement. An item's split is a hash of its key, so it
never changes when items are added to the lists and does not depend on Python's hash seed.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

from mechscope.errors import InputError

TEST_FRACTION = 0.25
SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class LabelledDataset:
    """Texts with 0/1 labels (1 = true statement / positive sentiment)."""

    name: str
    split: str
    texts: list[str]
    labels: list[int]
    groups: list[str]  # the item of each text (its true and false twins share it): pass as groups= to fit/sweep

    def __len__(self) -> int:
        return len(self.texts)


# ---------------------------------------------------------------------------- word lists

CITIES = {  # city -> country (one-token-ish, well-known capitals and large cities)
    "Paris": "France", "Lyon": "France", "Marseille": "France", "Berlin": "Germany", "Munich": "Germany",
    "Hamburg": "Germany", "Madrid": "Spain", "Barcelona": "Spain", "Seville": "Spain", "Rome": "Italy",
    "Milan": "Italy", "Naples": "Italy", "Venice": "Italy", "London": "the United Kingdom",
    "Manchester": "the United Kingdom", "Edinburgh": "the United Kingdom", "Dublin": "Ireland",
    "Lisbon": "Portugal", "Porto": "Portugal", "Amsterdam": "the Netherlands", "Rotterdam": "the Netherlands",
    "Brussels": "Belgium", "Vienna": "Austria", "Zurich": "Switzerland", "Geneva": "Switzerland",
    "Stockholm": "Sweden", "Oslo": "Norway", "Copenhagen": "Denmark", "Helsinki": "Finland",
    "Warsaw": "Poland", "Krakow": "Poland", "Prague": "the Czech Republic", "Budapest": "Hungary",
    "Athens": "Greece", "Istanbul": "Turkey", "Ankara": "Turkey", "Moscow": "Russia",
    "Saint Petersburg": "Russia", "Kyiv": "Ukraine", "Cairo": "Egypt", "Nairobi": "Kenya",
    "Lagos": "Nigeria", "Johannesburg": "South Africa", "Cape Town": "South Africa", "Casablanca": "Morocco",
    "Tokyo": "Japan", "Osaka": "Japan", "Kyoto": "Japan", "Beijing": "China", "Shanghai": "China",
    "Hong Kong": "China", "Seoul": "South Korea", "Mumbai": "India", "Delhi": "India", "Bangalore": "India",
    "Bangkok": "Thailand", "Hanoi": "Vietnam", "Jakarta": "Indonesia", "Manila": "the Philippines",
    "Singapore": "Singapore", "Sydney": "Australia", "Melbourne": "Australia", "Auckland": "New Zealand",
    "Toronto": "Canada", "Vancouver": "Canada", "Montreal": "Canada", "New York": "the United States",
    "Chicago": "the United States", "Los Angeles": "the United States", "Boston": "the United States",
    "Mexico City": "Mexico", "Havana": "Cuba", "Lima": "Peru", "Bogota": "Colombia",
    "Buenos Aires": "Argentina", "Santiago": "Chile", "Rio de Janeiro": "Brazil", "Sao Paulo": "Brazil",
    "Tehran": "Iran", "Baghdad": "Iraq", "Dubai": "the United Arab Emirates", "Riyadh": "Saudi Arabia",
    "Karachi": "Pakistan", "Dhaka": "Bangladesh",
}
CITY_TEMPLATES = ("The city of {city} is in {country}.", "{city} is a city in {country}.")

CATEGORIES = {  # category -> members ("X is a Y")
    "animal": ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "sheep", "wolf", "bear", "mouse",
               "elephant", "monkey", "goat"],
    "fruit": ["apple", "banana", "orange", "pear", "peach", "cherry", "grape", "lemon", "mango", "plum"],
    "vegetable": ["carrot", "potato", "onion", "cabbage", "pea", "bean", "turnip", "leek", "radish"],
    "tool": ["hammer", "saw", "wrench", "screwdriver", "drill", "chisel", "shovel", "rake", "axe"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "tram", "motorcycle", "van", "tractor"],
    "musical instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello", "oboe"],
    "colour": ["red", "blue", "green", "yellow", "purple", "brown", "pink", "grey"],
    "bird": ["sparrow", "eagle", "owl", "parrot", "crow", "robin", "swan", "pigeon", "penguin"],
    "piece of furniture": ["chair", "table", "sofa", "bed", "desk", "wardrobe", "bookshelf", "stool"],
}

POSITIVE = ["wonderful", "excellent", "delightful", "fantastic", "great", "lovely", "brilliant", "superb",
            "charming", "amazing", "pleasant", "beautiful", "enjoyable", "perfect", "marvellous", "terrific",
            "outstanding", "impressive", "heartwarming", "fun", "glorious", "splendid", "joyful", "magnificent",
            "fabulous", "cheerful", "inspiring", "remarkable", "exciting", "sublime"]
NEGATIVE = ["terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "bad", "poor", "miserable",
            "unpleasant", "ugly", "annoying", "painful", "dull", "mediocre", "disgusting", "tedious", "sad",
            "frustrating", "pathetic", "dismal", "awkward", "lousy", "depressing", "hideous", "gloomy",
            "appalling", "unbearable", "clumsy", "worthless"]
SENTIMENT_TEMPLATES = (
    "The movie was {w}.", "I thought the food was {w}.", "Our holiday was {w}.", "The concert was {w}.",
    "This book is {w}.", "The service at the hotel was {w}.", "My day at work was {w}.",
    "The new phone is {w}.", "Honestly, the game was {w}.", "The weather this weekend was {w}.",
)


# ---------------------------------------------------------------------------- builders


def _split_of(name: str, key: str) -> str:
    h = int.from_bytes(hashlib.sha256(f"{name}:{key}".encode()).digest()[:8], "big") / 2**64
    return "test" if h < TEST_FRACTION else "train"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _cities() -> list[tuple[str, str, int]]:
    """(item key, text, label) rows."""
    rng = random.Random(0)
    countries = sorted(set(CITIES.values()))
    rows = []
    for i, (city, country) in enumerate(CITIES.items()):
        tpl = CITY_TEMPLATES[i % len(CITY_TEMPLATES)]
        wrong = rng.choice([c for c in countries if c != country])
        rows.append((city, tpl.format(city=city, country=country), 1))
        rows.append((city, tpl.format(city=city, country=wrong), 0))
    return rows


def _arithmetic() -> list[tuple[str, str, int]]:
    rng = random.Random(1)
    rows = []
    for a in range(2, 10):
        for b in range(2, 10):
            if a > b:
                continue
            right = a + b
            wrong = right + rng.choice([-2, -1, 1, 2])
            for total, label in ((right, 1), (wrong, 0)):
                rows.append((f"{a}+{b}", f"{a} + {b} = {total}.", label))
    return rows


def _isa() -> list[tuple[str, str, int]]:
    rng = random.Random(2)
    cats = list(CATEGORIES)
    rows = []
    for cat, members in CATEGORIES.items():
        for x in members:
            other = rng.choice([c for c in cats if c != cat])
            for y, label in ((cat, 1), (other, 0)):
                rows.append((x, f"{_article(x).capitalize()} {x} is {_article(y)} {y}.", label))
    return rows


def _sentiment() -> list[tuple[str, str, int]]:
    rows = []
    for words, label in ((POSITIVE, 1), (NEGATIVE, 0)):
        for i, w in enumerate(words):
            for j in range(4):  # four templates per word, rotating, so each template sees both classes
                tpl = SENTIMENT_TEMPLATES[(i + 3 * j) % len(SENTIMENT_TEMPLATES)]
                rows.append((w, tpl.format(w=w), label))
    return rows


BUILDERS = {"cities": _cities, "arithmetic": _arithmetic, "isa": _isa, "sentiment": _sentiment}
GROUPS = {"truefalse": ("cities", "arithmetic", "isa")}


def names() -> list[str]:
    """The built-in dataset names."""
    return [*BUILDERS, *GROUPS]


def load(name: str, split: str = "train") -> LabelledDataset:
    """A built-in labelled dataset: name in names(); split "train", "test" (held out by item) or "all"."""
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if name in GROUPS:
        parts = [load(n, split) for n in GROUPS[name]]
        return LabelledDataset(name, split, [t for p in parts for t in p.texts], [y for p in parts for y in p.labels],
                               [f"{p.name}:{g}" for p in parts for g in p.groups])
    if name not in BUILDERS:
        raise InputError(f"Unknown probe dataset {name!r}; the built-in ones are {', '.join(names())}.")
    rows = [r for r in BUILDERS[name]() if split == "all" or _split_of(name, r[0]) == split]
    return LabelledDataset(name, split, [t for _, t, _ in rows], [y for _, _, y in rows], [k for k, _, _ in rows])


__all__ = ["LabelledDataset", "load", "names"]
