"""Built-in factual prompts for causal tracing: (prompt, subject, answer), written here (no download).

    from mechscope.circuits.facts import FACTS, known_facts
    facts = known_facts(model)          # the facts whose greedy next token is the answer's first token

Why a fixed list: the paper averages causal traces over facts the model knows; a small, well-known set (landmarks,
capitals, companies, languages, people, science) lets any model be traced without a dataset download. Every
prompt ends right before the answer, and the subject occurs verbatim in it; answers start with a space.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from mechscope.errors import InputError


class Fact(NamedTuple):
    prompt: str
    subject: str
    answer: str  # the expected continuation, with its leading space (" Paris")


def _f(prompt: str, subject: str, answer: str) -> Fact:
    return Fact(prompt, subject, answer)


FACTS: tuple[Fact, ...] = (
    # landmarks
    _f("The Eiffel Tower is located in the city of", "The Eiffel Tower", " Paris"),
    _f("The Colosseum is located in the city of", "The Colosseum", " Rome"),
    _f("The Statue of Liberty is located in the city of", "The Statue of Liberty", " New"),
    _f("Big Ben is located in the city of", "Big Ben", " London"),
    _f("The Brandenburg Gate is located in the city of", "The Brandenburg Gate", " Berlin"),
    _f("The Kremlin is located in the city of", "The Kremlin", " Moscow"),
    _f("The Sydney Opera House is located in the country of", "The Sydney Opera House", " Australia"),
    _f("The Taj Mahal is located in the country of", "The Taj Mahal", " India"),
    _f("The Great Wall is located in the country of", "The Great Wall", " China"),
    _f("Mount Fuji is located in the country of", "Mount Fuji", " Japan"),
    _f("The Pyramids of Giza are located in the country of", "The Pyramids of Giza", " Egypt"),
    _f("The Acropolis is located in the city of", "The Acropolis", " Athens"),
    _f("The Golden Gate Bridge is located in the city of", "The Golden Gate Bridge", " San"),
    _f("The Leaning Tower of Pisa is located in the country of", "The Leaning Tower of Pisa", " Italy"),
    _f("Machu Picchu is located in the country of", "Machu Picchu", " Peru"),
    _f("The Louvre is located in the city of", "The Louvre", " Paris"),
    _f("The Sagrada Familia is located in the city of", "The Sagrada Familia", " Barcelona"),
    _f("Buckingham Palace is located in the city of", "Buckingham Palace", " London"),
    _f("The Vatican is located in the city of", "The Vatican", " Rome"),
    _f("Stonehenge is located in the country of", "Stonehenge", " England"),
    # capitals
    _f("The capital of France is the city of", "France", " Paris"),
    _f("The capital of Germany is the city of", "Germany", " Berlin"),
    _f("The capital of Italy is the city of", "Italy", " Rome"),
    _f("The capital of Spain is the city of", "Spain", " Madrid"),
    _f("The capital of Japan is the city of", "Japan", " Tokyo"),
    _f("The capital of Russia is the city of", "Russia", " Moscow"),
    _f("The capital of England is the city of", "England", " London"),
    _f("The capital of Egypt is the city of", "Egypt", " Cairo"),
    _f("The capital of Greece is the city of", "Greece", " Athens"),
    _f("The capital of Portugal is the city of", "Portugal", " Lisbon"),
    _f("The capital of Austria is the city of", "Austria", " Vienna"),
    _f("The capital of Ireland is the city of", "Ireland", " Dublin"),
    _f("The capital of China is the city of", "China", " Beijing"),
    _f("The capital of Canada is the city of", "Canada", " Ottawa"),
    _f("The capital of Norway is the city of", "Norway", " Oslo"),
    _f("The capital of Sweden is the city of", "Sweden", " Stockholm"),
    _f("The capital of Poland is the city of", "Poland", " Warsaw"),
    _f("The capital of Hungary is the city of", "Hungary", " Budapest"),
    _f("The capital of Thailand is the city of", "Thailand", " Bangkok"),
    _f("The capital of Kenya is the city of", "Kenya", " Nairobi"),
    _f("The capital of Argentina is the city of", "Argentina", " Buenos"),
    _f("The capital of South Korea is the city of", "South Korea", " Seoul"),
    _f("The capital of Denmark is the city of", "Denmark", " Copenhagen"),
    _f("The capital of the Netherlands is the city of", "the Netherlands", " Amsterdam"),
    _f("The capital of Finland is the city of", "Finland", " Helsinki"),
    _f("The capital of Turkey is the city of", "Turkey", " Ankara"),
    _f("The capital of Peru is the city of", "Peru", " Lima"),
    _f("The capital of Cuba is the city of", "Cuba", " Havana"),
    # companies and their founders / countries
    _f("Microsoft was founded by Bill", "Microsoft", " Gates"),
    _f("Apple was founded by Steve", "Apple", " Jobs"),
    _f("Facebook was founded by Mark", "Facebook", " Zuckerberg"),
    _f("Amazon was founded by Jeff", "Amazon", " Bezos"),
    _f("Tesla is led by Elon", "Tesla", " Musk"),
    _f("Toyota is a car company from the country of", "Toyota", " Japan"),
    _f("Volkswagen is a car company from the country of", "Volkswagen", " Germany"),
    _f("Ferrari is a car company from the country of", "Ferrari", " Italy"),
    _f("Samsung is a company from the country of", "Samsung", " South"),
    _f("Nokia is a company from the country of", "Nokia", " Finland"),
    _f("IKEA is a company from the country of", "IKEA", " Sweden"),
    _f("Renault is a car company from the country of", "Renault", " France"),
    _f("Sony is a company from the country of", "Sony", " Japan"),
    _f("BMW is a car company from the country of", "BMW", " Germany"),
    _f("Nestle is a company from the country of", "Nestle", " Switzerland"),
    _f("The iPhone is made by the company", "The iPhone", " Apple"),
    _f("Windows is an operating system made by", "Windows", " Microsoft"),
    _f("The PlayStation is a game console made by", "The PlayStation", " Sony"),
    # languages
    _f("The official language of France is", "France", " French"),
    _f("The official language of Germany is", "Germany", " German"),
    _f("The official language of Spain is", "Spain", " Spanish"),
    _f("The official language of Italy is", "Italy", " Italian"),
    _f("The official language of Japan is", "Japan", " Japanese"),
    _f("The official language of Russia is", "Russia", " Russian"),
    _f("The official language of Brazil is", "Brazil", " Portuguese"),
    _f("The official language of China is", "China", " Mandarin"),
    _f("The official language of Greece is", "Greece", " Greek"),
    _f("The official language of Mexico is", "Mexico", " Spanish"),
    _f("The official language of Argentina is", "Argentina", " Spanish"),
    _f("The official language of Portugal is", "Portugal", " Portuguese"),
    _f("The official language of Poland is", "Poland", " Polish"),
    _f("The official language of the Netherlands is", "the Netherlands", " Dutch"),
    _f("The official language of Sweden is", "Sweden", " Swedish"),
    _f("The official language of Turkey is", "Turkey", " Turkish"),
    # people
    _f("Albert Einstein was born in the country of", "Albert Einstein", " Germany"),
    _f("William Shakespeare was born in the country of", "William Shakespeare", " England"),
    _f("Leonardo da Vinci was born in the country of", "Leonardo da Vinci", " Italy"),
    _f("Napoleon Bonaparte was born on the island of", "Napoleon Bonaparte", " Corsica"),
    _f("Mozart was born in the city of", "Mozart", " Salzburg"),
    _f("The Mona Lisa was painted by Leonardo da", "The Mona Lisa", " Vinci"),
    _f("Romeo and Juliet was written by William", "Romeo and Juliet", " Shakespeare"),
    _f("The theory of relativity was developed by Albert", "The theory of relativity", " Einstein"),
    _f("Harry Potter was written by J.K.", "Harry Potter", " Rowling"),
    _f("Barack Obama was the president of the United", "Barack Obama", " States"),
    _f("Pablo Picasso was a painter from the country of", "Pablo Picasso", " Spain"),
    _f("Cristiano Ronaldo is a football player from the country of", "Cristiano Ronaldo", " Portugal"),
    _f("Lionel Messi is a football player from the country of", "Lionel Messi", " Argentina"),
    # geography and science
    _f("The Nile river flows through the country of", "The Nile river", " Egypt"),
    _f("The Amazon rainforest is mostly in the country of", "The Amazon rainforest", " Brazil"),
    _f("The currency of Japan is the", "Japan", " yen"),
    _f("The currency of the United Kingdom is the", "the United Kingdom", " pound"),
    _f("The currency of India is the", "India", " rupee"),
    _f("The chemical symbol of gold is", "gold", " Au"),
    _f("The largest planet in the solar system is", "the solar system", " Jupiter"),
    _f("Water is made of hydrogen and", "Water", " oxygen"),
    _f("The Sahara desert is located on the continent of", "The Sahara desert", " Africa"),
    _f("Brazil is located on the continent of", "Brazil", " South"),
    _f("Australia is a country and a", "Australia", " continent"),
    _f("Paris is the capital of", "Paris", " France"),
    _f("Tokyo is the capital of", "Tokyo", " Japan"),
    _f("Berlin is the capital of", "Berlin", " Germany"),
    _f("Madrid is the capital of", "Madrid", " Spain"),
    _f("Rome is the capital of", "Rome", " Italy"),
    _f("Moscow is the capital of", "Moscow", " Russia"),
    _f("Cairo is the capital of", "Cairo", " Egypt"),
    _f("Ottawa is the capital of", "Ottawa", " Canada"),
    _f("Lisbon is the capital of", "Lisbon", " Portugal"),
    _f("Athens is the capital of", "Athens", " Greece"),
)


def known_facts(model, facts: Sequence[Fact] = FACTS, *, batch_size: int = 32) -> list[Fact]:
    """The facts whose greedy next token (on the prompt alone) is the first token of the answer: those a causal
    trace of the model's own answer is about. Prompts run in batches, left-padded, so each one's last position
    is the next-token prediction."""
    facts = [Fact(*f) for f in facts]
    if not facts:
        raise InputError("known_facts needs at least one (prompt, subject, answer) fact.")
    tok = model.require_tokenizer()
    keep = []
    with torch.inference_mode():
        for i in range(0, len(facts), batch_size):
            chunk = facts[i:i + batch_size]
            tokens, mask = model.prepare([f.prompt for f in chunk], padding_side="left")
            greedy = model(tokens, attention_mask=mask)[:, -1].argmax(-1).tolist()
            for f, g in zip(chunk, greedy):
                ids = tok(f.answer, add_special_tokens=False)["input_ids"]
                if ids and ids[0] == g:
                    keep.append(f)
    return keep


__all__ = ["FACTS", "Fact", "known_facts"]
