#!/usr/bin/env python3
"""Generates haloflow-prefs, a small preference dataset written for haloflow (CC0-1.0).

Short factual questions from a few families (capitals, arithmetic, opposites, plurals, time
units, animal sounds); the chosen reply answers correctly in one polite sentence, the rejected
reply is wrong, evasive, rude or rambling. A held-out set of questions from the same families
(items never seen in training) carries reference answers, so a rule judge can check them.

    python datasets/haloflow-prefs/make.py    # rewrites pairs.jsonl and heldout.jsonl (deterministic)
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(20261126)

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Czechia", "Prague"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"),
    ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Israel", "Jerusalem"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Philippines", "Manila"), ("Switzerland", "Bern")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "young"), ("rich", "poor"),
    ("strong", "weak"), ("tall", "short"), ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"), ("first", "last"),
    ("inside", "outside"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("day", "night"), ("left", "right")]
PLURALS = [("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"), ("woman", "women"),
    ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("box", "boxes"),
    ("city", "cities"), ("baby", "babies"), ("bus", "buses"), ("ox", "oxen"), ("cactus", "cacti"), ("fish", "fish")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("sheep", "bleats"), ("horse", "neighs"),
    ("lion", "roars"), ("owl", "hoots"), ("pig", "oinks"), ("snake", "hisses"), ("frog", "croaks"), ("bee", "buzzes")]

EVASIVE = ["I'm not sure, you should look that up yourself.", "That is not something I can help with.",
           "Why do you want to know that?", "Hmm, hard to say. It depends."]
RUDE = ["Everyone knows that, stop asking silly questions.", "Figure it out yourself.", "What a boring question."]


def rambling(answer):
    return ("Well, that is a really interesting question, and there are many things one could say about it, "
            "and people have discussed such things for a long time, so after thinking about it for a while, "
            f"I suppose the answer might be {answer}, but I would not be completely sure.")


def families():
    """(family, question, correct sentence, short answer, wrong sentence) for every item."""
    out = []
    for country, city in CAPITALS:
        wrong = rng.choice([c for _, c in CAPITALS if c != city])
        out.append(("capital", f"What is the capital of {country}?", f"The capital of {country} is {city}.", city,
                    f"The capital of {country} is {wrong}."))
    for a in range(2, 13):
        for b in (3, 7, 9):
            out.append(("arithmetic", f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b),
                        f"{a} times {b} is {a * b + rng.choice([-2, -1, 1, 3])}."))
            out.append(("arithmetic", f"What is {a} plus {b * 4}?", f"{a} plus {b * 4} is {a + b * 4}.", str(a + b * 4),
                        f"{a} plus {b * 4} is {a + b * 4 + rng.choice([-3, 1, 2, 10])}."))
    for word, opposite in OPPOSITES:
        wrong = rng.choice([o for _, o in OPPOSITES if o != opposite])
        out.append(("opposite", f"What is the opposite of \"{word}\"?", f"The opposite of \"{word}\" is \"{opposite}\".", opposite,
                    f"The opposite of \"{word}\" is \"{wrong}\"."))
    for word, plural in PLURALS:
        out.append(("plural", f"What is the plural of \"{word}\"?", f"The plural of \"{word}\" is \"{plural}\".", plural,
                    f"The plural of \"{word}\" is \"{word}s\"." if plural != word + "s" else f"The plural of \"{word}\" is \"{word}es\"."))
    for hours in range(1, 13):
        out.append(("time", f"How many minutes are there in {hours} hours?", f"The number of minutes in {hours} hours is {hours * 60}.",
                    str(hours * 60), f"The number of minutes in {hours} hours is {hours * 100}."))
    for animal, sound in SOUNDS:
        wrong = rng.choice([s for _, s in SOUNDS if s != sound])
        out.append(("sound", f"What sound does a {animal} make?", f"A {animal} {sound}.", sound, f"A {animal} {wrong}."))
    return out


def main():
    items = families()
    rng.shuffle(items)
    heldout = items[:40]
    train = items[40:]
    with open(HERE / "pairs.jsonl", "w") as f:
        for family, question, good, _, wrong in train:
            # One pair per kind of bad reply, so the data says what "good" means from several sides.
            for bad in (wrong, rng.choice(EVASIVE), rng.choice(RUDE), rambling(wrong.rstrip(".").split(" is ")[-1])):
                f.write(json.dumps({"prompt": question, "chosen": good, "rejected": bad, "family": family}, ensure_ascii=False) + "\n")
    with open(HERE / "heldout.jsonl", "w") as f:
        for i, (family, question, _, answer, _) in enumerate(heldout):
            f.write(json.dumps({"question_id": i + 1, "category": family, "turns": [question], "reference": [answer]}, ensure_ascii=False) + "\n")
    print(f"{len(train)} training questions -> {4 * len(train)} pairs; {len(heldout)} held-out questions")


if __name__ == "__main__":
    main()
