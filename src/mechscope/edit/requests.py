"""Built-in edit requests, written here (no download): facts about landmarks, capitals and official languages,
CounterFact-style. Each has the edit prompt, the subject, the true (old) object, a new single-token target, two
paraphrases and two neighbourhood prompts (other subjects whose answer is the same old object: an edit should
leave them alone). Every object and target is one SmolLM2 token with a leading space.

    reqs = edit.requests.load()            # list of EditRequest: 37 facts SmolLM2-135M knows
"""

from __future__ import annotations

from mechscope.edit.locate import EditRequest

CITY = "{} is located in the city of"
CITY_P = ("Where is {}? It is in the city of", "Tourists who want to see {} travel to the city of")

# landmark subject, old city, new city, two other landmarks of the old city
LANDMARKS = [
    ("The Eiffel Tower", "Paris", "Rome", "The Louvre Museum", "The Arc de Triomphe"),
    ("The Louvre Museum", "Paris", "London", "The Eiffel Tower", "The Arc de Triomphe"),
    ("The Colosseum", "Rome", "Paris", "The Trevi Fountain", "The Pantheon"),
    ("The Trevi Fountain", "Rome", "Berlin", "The Colosseum", "The Pantheon"),
    ("Buckingham Palace", "London", "Madrid", "Big Ben", "Tower Bridge"),
    ("The Brandenburg Gate", "Berlin", "London", "The Reichstag building", "Checkpoint Charlie"),
    ("The Kremlin", "Moscow", "Tokyo", "Red Square", "The Bolshoi Theatre"),
    ("The Acropolis", "Athens", "Cairo", "The Parthenon", "The Temple of Olympian Zeus"),
    ("The Forbidden City", "Beijing", "Tokyo", "Tiananmen Square", "The Temple of Heaven"),
    ("The Statue of Liberty", "New", "Chicago", "The Empire State Building", "Times Square"),
    ("The Prado Museum", "Madrid", "Rome", "The Royal Palace of Madrid", "Retiro Park"),
    ("The White House", "Washington", "Boston", "The Lincoln Memorial", "The Washington Monument"),
]

CAPITAL = "The capital city of {} is"
CAPITAL_P = ("{} has its capital in the city of", "The seat of the government of {} is the city of")
# country, old capital, new capital, two landmarks of the old capital (neighbourhood: same old answer)
CAPITALS = [
    ("France", "Paris", "Berlin", "The Eiffel Tower", "The Louvre Museum"),
    ("Italy", "Rome", "London", "The Colosseum", "The Trevi Fountain"),
    ("Germany", "Berlin", "Paris", "The Brandenburg Gate", "The Reichstag building"),
    ("England", "London", "Rome", "Big Ben", "Buckingham Palace"),
    ("Russia", "Moscow", "Berlin", "The Kremlin", "Red Square"),
    ("Greece", "Athens", "Rome", "The Acropolis", "The Parthenon"),
    ("China", "Beijing", "Moscow", "The Forbidden City", "Tiananmen Square"),
    ("Spain", "Madrid", "Paris", "The Prado Museum", "Retiro Park"),
    ("Japan", "Tokyo", "Beijing", "Tokyo Tower", "The Imperial Palace of Japan"),
    ("Egypt", "Cairo", "Athens", "The Egyptian Museum", "Tahrir Square"),
]

LANGUAGE = "The official language of {} is"
LANGUAGE_P = ("In {}, most people speak", "The people of {} speak the language called")
# country, old language, new language, two other countries with the same language
LANGUAGES = [
    ("Spain", "Spanish", "German", "Mexico", "Argentina"),
    ("Mexico", "Spanish", "French", "Spain", "Colombia"),
    ("Colombia", "Spanish", "English", "Mexico", "Peru"),
    ("Brazil", "Portuguese", "German", "Portugal", "Angola"),
    ("Portugal", "Portuguese", "French", "Brazil", "Mozambique"),
    ("Germany", "German", "Italian", "Austria", "Liechtenstein"),
    ("Austria", "German", "French", "Germany", "Liechtenstein"),
    ("Egypt", "Arabic", "Greek", "Saudi Arabia", "Jordan"),
    ("Saudi Arabia", "Arabic", "English", "Egypt", "Iraq"),
    ("Australia", "English", "French", "New Zealand", "Canada"),
    ("Russia", "Russian", "Chinese", "Belarus", "Kyrgyzstan"),
    ("Greece", "Greek", "Turkish", "Cyprus", "Ancient Greece"),
    ("Japan", "Japanese", "Korean", "the Japanese islands", "Okinawa"),
    ("Italy", "Italian", "Spanish", "San Marino", "Vatican City"),
    ("France", "French", "Dutch", "Monaco", "Haiti"),
]


def _make(template: str, paraphrases: tuple[str, str], subject: str, old: str, new: str, n1: str,
          n2: str) -> EditRequest:
    return EditRequest(prompt=template.format(subject), subject=subject, target=" " + new, old=" " + old,
                       paraphrases=[p.format(subject) for p in paraphrases],
                       neighbours=[template.format(n1), template.format(n2)])


def all_requests() -> list[EditRequest]:
    """Every written request (landmarks, capitals, languages), known to SmolLM2 or not."""
    out = [_make(CITY, CITY_P, *row) for row in LANDMARKS]
    out += [_make(CAPITAL, CAPITAL_P, *row) for row in CAPITALS]
    out += [_make(LANGUAGE, LANGUAGE_P, *row) for row in LANGUAGES]
    return out


def load() -> list[EditRequest]:
    """The 37 built-in requests. SmolLM2-135M knows each: the old object is in its top 5 on the prompt and more
    likely than the new target (checked by tests/edit/test_rome.py's slow test; "Big Ben" and "Red Square",
    which it does not place in London and Moscow, are kept only as neighbourhood prompts)."""
    return all_requests()


__all__ = ["all_requests", "load"]
