#!/usr/bin/env python3
"""Generates haloflow-prefs, a small preference dataset written for haloflow (CC0-1.0).

Short factual questions whose answer is one word or number, in thirteen families (capitals,
arithmetic, subtraction, comparisons, opposites, plurals, time units, other units, animal sounds,
days, months, colours, letter counts). Every correct sentence ends with its answer. The training
pairs (`pairs.jsonl`) put the correct sentence against a wrong, an evasive, a rude and a rambling
reply; the held-out questions (`heldout.jsonl`, MT-Bench format) carry the reference answer, so the
quickstart's `rule` judge can check a reply's last word or number against it. No held-out
question, and no fact behind one (`3 times 9` is `9 times 3`; `40 minus 28` is `12 plus 28`), is
in the training pairs: the script asserts it, and asserts that the rule judge's matcher accepts
each correct sentence and rejects each wrong one.

    python3 datasets/haloflow-prefs/make.py    # rewrites pairs.jsonl and heldout.jsonl (deterministic)
"""
import json
import os
import random
import re
from collections import namedtuple
from pathlib import Path

HERE = Path(__file__).parent
rng = random.Random(20261126)

# A question with a one-word answer. `key` names the fact behind it (shared by questions that
# ask the same fact another way), so that no fact is both trained on and held out.
Item = namedtuple("Item", "family key question correct answer wrong wrong_answer")

# (training questions, held-out questions) per family: 144 training questions (576 pairs) and
# 240 held-out questions.
QUOTAS = {"capital": (16, 30), "arithmetic": (16, 30), "subtraction": (10, 20), "comparison": (10, 20),
          "opposite": (14, 24), "plural": (12, 20), "time": (10, 16), "units": (10, 16), "sound": (8, 10),
          "day": (6, 8), "month": (10, 16), "colour": (10, 14), "letters": (12, 16)}

# The 40 held-out questions of the dataset's first version, kept first and with their ids so that
# earlier quickstart results stay comparable (only id 37's "1 hours" was corrected to "1 hour").
HELDOUT_V1 = ["What is the capital of Turkey?", "What is 4 plus 28?", "What is the capital of Thailand?",
    "What is 10 times 7?", "What is 5 times 3?", "What is 6 plus 36?", "What is 3 times 9?",
    "What is the opposite of \"left\"?", "What is the plural of \"wolf\"?", "What is the plural of \"city\"?",
    "What is the capital of India?", "What is 3 plus 12?", "What is 6 plus 12?", "How many minutes are there in 5 hours?",
    "What is the opposite of \"happy\"?", "What is the capital of Vietnam?", "What is the opposite of \"full\"?",
    "What is 7 plus 12?", "What is 4 plus 36?", "What is 11 times 3?", "What is the plural of \"goose\"?",
    "What sound does a cow make?", "How many minutes are there in 6 hours?", "What is the plural of \"leaf\"?",
    "What is the capital of New Zealand?", "How many minutes are there in 10 hours?", "What sound does a sheep make?",
    "What is the capital of Iraq?", "What is the capital of Sweden?", "What is the capital of Indonesia?",
    "What is 6 times 9?", "What is 9 times 7?", "What is the capital of Morocco?", "What is 12 plus 28?",
    "What is 4 times 9?", "What is the capital of Ireland?", "How many minutes are there in 1 hour?",
    "What is 9 plus 28?", "What is 2 plus 12?", "What is the capital of Brazil?"]

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"), ("Peru", "Lima"),
    ("Chile", "Santiago"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Greece", "Athens"), ("Turkey", "Ankara"), ("Russia", "Moscow"),
    ("Ireland", "Dublin"), ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Hungary", "Budapest"), ("Czechia", "Prague"),
    ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("South Korea", "Seoul"), ("Indonesia", "Jakarta"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("Nigeria", "Abuja"), ("Morocco", "Rabat"), ("Ethiopia", "Addis Ababa"), ("Cuba", "Havana"),
    ("Colombia", "Bogotá"), ("Venezuela", "Caracas"), ("Iran", "Tehran"), ("Iraq", "Baghdad"), ("Israel", "Jerusalem"),
    ("Saudi Arabia", "Riyadh"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"), ("Philippines", "Manila"), ("Switzerland", "Bern"),
    ("Ukraine", "Kyiv"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Serbia", "Belgrade"), ("Croatia", "Zagreb"),
    ("Slovakia", "Bratislava"), ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Iceland", "Reykjavik"),
    ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"), ("Zambia", "Lusaka"),
    ("Angola", "Luanda"), ("Nepal", "Kathmandu"), ("Afghanistan", "Kabul"), ("Syria", "Damascus"), ("Jordan", "Amman"),
    ("Lebanon", "Beirut"), ("Qatar", "Doha"), ("Laos", "Vientiane"), ("Ecuador", "Quito"), ("Uruguay", "Montevideo"),
    ("Jamaica", "Kingston"), ("Libya", "Tripoli"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Sudan", "Khartoum"),
    ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"), ("Uzbekistan", "Tashkent"), ("North Korea", "Pyongyang"), ("Albania", "Tirana"),
    ("Cyprus", "Nicosia"), ("Malta", "Valletta"), ("Belarus", "Minsk"), ("Honduras", "Tegucigalpa"), ("Nicaragua", "Managua"),
    ("Mali", "Bamako"), ("Rwanda", "Kigali"), ("Somalia", "Mogadishu"), ("Mozambique", "Maputo"), ("Namibia", "Windhoek")]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"), ("up", "down"),
    ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "young"), ("rich", "poor"),
    ("strong", "weak"), ("tall", "short"), ("wet", "dry"), ("loud", "quiet"), ("clean", "dirty"), ("first", "last"),
    ("inside", "outside"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("day", "night"), ("left", "right"),
    ("above", "below"), ("before", "after"), ("high", "low"), ("thick", "thin"), ("true", "false"), ("yes", "no"),
    ("north", "south"), ("east", "west"), ("cheap", "expensive"), ("near", "far"), ("good", "bad"), ("laugh", "cry"),
    ("love", "hate"), ("friend", "enemy"), ("question", "answer"), ("remember", "forget"), ("asleep", "awake"),
    ("alive", "dead"), ("always", "never"), ("entrance", "exit"), ("maximum", "minimum"), ("positive", "negative"),
    ("wide", "narrow"), ("deep", "shallow"), ("top", "bottom"), ("front", "back"), ("sunrise", "sunset"), ("many", "few"),
    ("borrow", "lend"), ("give", "take"), ("summer", "winter"), ("odd", "even"), ("private", "public"), ("polite", "rude"),
    ("smooth", "rough"), ("increase", "decrease"), ("import", "export"), ("possible", "impossible")]
PLURALS = [("child", "children"), ("mouse", "mice"), ("tooth", "teeth"), ("foot", "feet"), ("man", "men"), ("woman", "women"),
    ("goose", "geese"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("box", "boxes"),
    ("city", "cities"), ("baby", "babies"), ("bus", "buses"), ("ox", "oxen"), ("cactus", "cacti"), ("fish", "fish"),
    ("sheep", "sheep"), ("deer", "deer"), ("louse", "lice"), ("half", "halves"), ("life", "lives"), ("wife", "wives"),
    ("loaf", "loaves"), ("shelf", "shelves"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("church", "churches"), ("glass", "glasses"), ("dish", "dishes"), ("lady", "ladies"), ("story", "stories"),
    ("party", "parties"), ("fly", "flies"), ("thief", "thieves"), ("calf", "calves"), ("crisis", "crises"),
    ("nucleus", "nuclei"), ("fungus", "fungi"), ("phenomenon", "phenomena"), ("criterion", "criteria"), ("die", "dice"),
    ("fox", "foxes"), ("key", "keys"), ("toy", "toys"), ("berry", "berries"), ("country", "countries"), ("wish", "wishes")]
SOUNDS = [("dog", "barks"), ("cat", "meows"), ("cow", "moos"), ("duck", "quacks"), ("sheep", "bleats"), ("horse", "neighs"),
    ("lion", "roars"), ("owl", "hoots"), ("pig", "oinks"), ("snake", "hisses"), ("frog", "croaks"), ("bee", "buzzes"),
    ("wolf", "howls"), ("mouse", "squeaks"), ("donkey", "brays"), ("crow", "caws"), ("turkey", "gobbles"), ("hen", "clucks"),
    ("rooster", "crows"), ("dove", "coos"), ("elephant", "trumpets"), ("bear", "growls"), ("cricket", "chirps")]
# (what the question asks about, the same as a sentence's subject, its colour)
COLOURS = [("fresh snow", "Fresh snow", "white"), ("grass", "Grass", "green"), ("coal", "Coal", "black"),
    ("a ripe banana", "A ripe banana", "yellow"), ("a ripe tomato", "A ripe tomato", "red"), ("milk", "Milk", "white"),
    ("a lemon", "A lemon", "yellow"), ("a carrot", "A carrot", "orange"), ("a pumpkin", "A pumpkin", "orange"),
    ("a ripe strawberry", "A ripe strawberry", "red"), ("an emerald", "An emerald", "green"), ("a ruby", "A ruby", "red"),
    ("a sapphire", "A sapphire", "blue"), ("a flamingo", "A flamingo", "pink"), ("a raven", "A raven", "black"),
    ("chalk", "Chalk", "white"), ("a lime", "A lime", "green"), ("an eggplant", "An eggplant", "purple"),
    ("milk chocolate", "Milk chocolate", "brown"), ("the sky on a clear day", "The sky on a clear day", "blue"),
    ("soot", "Soot", "black"), ("table salt", "Table salt", "white"), ("blood", "Blood", "red"),
    ("a cucumber", "A cucumber", "green"), ("cinnamon", "Cinnamon", "brown"), ("a crow", "A crow", "black"),
    ("a pea", "A pea", "green"), ("charcoal", "Charcoal", "black"), ("ivory", "Ivory", "white"), ("a plum", "A plum", "purple")]
LETTER_WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "apple", "house", "water", "green", "table", "chair",
    "window", "garden", "yellow", "orange", "pencil", "rabbit", "monkey", "bottle", "kitchen", "teacher", "morning",
    "library", "holiday", "elephant", "mountain", "computer", "sandwich", "dinosaur", "umbrella", "butterfly",
    "chocolate", "telephone", "newspaper", "breakfast", "hamburger", "strawberry", "basketball", "helicopter"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth", "eleventh",
            "twelfth"]
# (what is counted, the unit asked about in singular and plural, how many of the first in one unit,
#  the number a reply gets when it uses a wrong factor)
TIME_UNITS = [("minutes", "hour", "hours", 60, 100), ("seconds", "minute", "minutes", 60, 100),
              ("hours", "day", "days", 24, 12), ("days", "week", "weeks", 7, 5), ("months", "year", "years", 12, 10)]
OTHER_UNITS = [("centimeters", "meter", "meters", 100, 10), ("millimeters", "centimeter", "centimeters", 10, 100),
               ("grams", "kilogram", "kilograms", 1000, 100), ("meters", "kilometer", "kilometers", 1000, 100),
               ("eggs", "dozen", "dozen", 12, 10), ("inches", "foot", "feet", 12, 10)]

EVASIVE = ["I'm not sure, you should look that up yourself.", "That is not something I can help with.",
           "Why do you want to know that?", "Hmm, hard to say. It depends."]
RUDE = ["Everyone knows that, stop asking silly questions.", "Figure it out yourself.", "What a boring question."]

# The rule judge's matcher (stages/judge/src/backends/rule.rs with the quickstart's
# answer_regex "([\p{L}\p{N}]+)"): the last run of letters and digits, case folded. Python's
# [^\W_] is letters and digits too; the references are kept to Latin letters and ASCII digits
# (asserted below), where both engines agree.
ANSWER = re.compile(r"[^\W_]+")
LATIN = re.compile(r"^[0-9A-Za-z\u00C0-\u024F ]+$")


def rule_answer(text):
    """The answer the rule judge reads from `text`: its last word or number, lower case."""
    found = ANSWER.findall(text)
    return found[-1].lower() if found else None


def rambling(answer):
    """A long reply that hedges `answer`."""
    return ("Well, that is a really interesting question, and there are many things one could say about it, "
            "and people have discussed such things for a long time, so after thinking about it for a while, "
            f"I suppose the answer might be {answer}, but I would not be completely sure.")


def other(choices, answer):
    """A wrong answer drawn from `choices`: any with another last word than `answer`."""
    return rng.choice([c for c in choices if rule_answer(c) != rule_answer(answer)])


def near(value, deltas):
    """A wrong number close to `value` (never negative, never `value` itself)."""
    return rng.choice([value + d for d in deltas if d != 0 and value + d >= 0])


def sum_key(a, b):
    """The fact `a + b`, whether asked as a sum or as a difference."""
    return ("sum", *sorted((a, b)))


def product_key(a, b):
    """The fact `a × b`, whether asked as a product or as a unit conversion."""
    return ("product", *sorted((a, b)))


def arithmetic():
    """Products of 2..12 and sums with a two-digit number."""
    for a in range(2, 13):
        for b in range(2, 13):
            wrong = near(a * b, [-2, -1, 1, 3])
            yield Item("arithmetic", product_key(a, b), f"What is {a} times {b}?", f"{a} times {b} is {a * b}.", str(a * b),
                       f"{a} times {b} is {wrong}.", str(wrong))
    for a in range(2, 20):
        for b in (12, 15, 21, 28, 36, 44):
            wrong = near(a + b, [-3, 1, 2, 10])
            yield Item("arithmetic", sum_key(a, b), f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.", str(a + b),
                       f"{a} plus {b} is {wrong}.", str(wrong))


def subtraction():
    """Differences of two-digit numbers, never negative."""
    for a in range(13, 60, 2):
        for b in (4, 7, 9, 11):
            wrong = near(a - b, [-2, -1, 1, 2, 10])
            yield Item("subtraction", sum_key(a - b, b), f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.", str(a - b),
                       f"{a} minus {b} is {wrong}.", str(wrong))


def comparison():
    """The larger or the smaller of two numbers below 100."""
    seen = set()
    while len(seen) < 80:
        x, y = rng.sample(range(2, 100), 2)
        if (min(x, y), max(x, y)) in seen:
            continue
        seen.add((min(x, y), max(x, y)))
        word, answer = rng.choice([("larger", max(x, y)), ("smaller", min(x, y))])
        wrong = x + y - answer
        yield Item("comparison", ("compare", *sorted((x, y))), f"Which number is {word}, {x} or {y}?",
                   f"The {word} number is {answer}.", str(answer), f"The {word} number is {wrong}.", str(wrong))


def capitals():
    """The capital of a country (the wrong answer is another capital)."""
    for country, city in CAPITALS:
        wrong = other([c for _, c in CAPITALS], city)
        yield Item("capital", ("capital", country), f"What is the capital of {country}?", f"The capital of {country} is {city}.",
                   city, f"The capital of {country} is {wrong}.", wrong)


def opposites():
    """The opposite of a word."""
    for word, opposite in OPPOSITES:
        wrong = other([o for _, o in OPPOSITES], opposite)
        yield Item("opposite", ("opposite", *sorted((word, opposite))), f"What is the opposite of \"{word}\"?",
                   f"The opposite of \"{word}\" is \"{opposite}\".", opposite, f"The opposite of \"{word}\" is \"{wrong}\".", wrong)


def plurals():
    """The plural of a noun (the wrong answer adds -s, or -es)."""
    for word, plural in PLURALS:
        wrong = word + "s" if plural != word + "s" else word + "es"
        yield Item("plural", ("plural", word), f"What is the plural of \"{word}\"?", f"The plural of \"{word}\" is \"{plural}\".",
                   plural, f"The plural of \"{word}\" is \"{wrong}\".", wrong)


def conversions(family, units):
    """How many of one unit make 1..12 of another."""
    for counted, one, many, factor, wrong_factor in units:
        for n in range(1, 13):
            unit = one if n == 1 else many
            value = n * factor
            yield Item(family, product_key(n, factor), f"How many {counted} are there in {n} {unit}?",
                       f"The number of {counted} in {n} {unit} is {value}.", str(value),
                       f"The number of {counted} in {n} {unit} is {n * wrong_factor}.", str(n * wrong_factor))


def sounds():
    """The sound an animal makes."""
    for animal, sound in SOUNDS:
        wrong = other([s for _, s in SOUNDS], sound)
        yield Item("sound", ("sound", animal), f"What sound does a {animal} make?", f"A {animal} {sound}.", sound,
                   f"A {animal} {wrong}.", wrong)


def order(family, names):
    """Which name comes one or two places after or before another in a cycle (days, months)."""
    for i, name in enumerate(names):
        for step, when in ((1, ""), (2, f"two {family}s ")):
            later = names[(i + step) % len(names)]
            for direction, asked, answer in (("after", name, later), ("before", later, name)):
                said = f"The {family} {direction}" if step == 1 else f"Two {family}s {direction}"
                wrong = other([n for n in names if n not in (name, later)], answer)
                yield Item(family, (family, name, later), f"Which {family} comes {when}{direction} {asked}?",
                           f"{said} {asked} is {answer}.", answer, f"{said} {asked} is {wrong}.", wrong)


def month_ordinals():
    """The n-th month of the year."""
    for ordinal, month in zip(ORDINALS, MONTHS):
        wrong = other(MONTHS, month)
        yield Item("month", ("month", ordinal), f"What is the {ordinal} month of the year?",
                   f"The {ordinal} month of the year is {month}.", month, f"The {ordinal} month of the year is {wrong}.", wrong)


def colours():
    """The colour of a common thing."""
    for thing, subject, colour in COLOURS:
        wrong = other(sorted({c for _, _, c in COLOURS}), colour)
        yield Item("colour", ("colour", thing), f"What colour is {thing}?", f"{subject} is {colour}.", colour,
                   f"{subject} is {wrong}.", wrong)


def letters():
    """The number of letters in a common word."""
    for word in LETTER_WORDS:
        wrong = near(len(word), [-1, 1, 2])
        yield Item("letters", ("letters", word), f"How many letters are there in the word \"{word}\"?",
                   f"The number of letters in \"{word}\" is {len(word)}.", str(len(word)),
                   f"The number of letters in \"{word}\" is {wrong}.", str(wrong))


def pool():
    """Every question the families can ask, in a fixed order."""
    return [*capitals(), *arithmetic(), *subtraction(), *comparison(), *opposites(), *plurals(),
            *conversions("time", TIME_UNITS), *conversions("units", OTHER_UNITS), *sounds(), *order("day", DAYS),
            *order("month", MONTHS), *month_ordinals(), *colours(), *letters()]


def split(items):
    """(training items, held-out items): HELDOUT_V1 first, then each family's quota of random
    questions, never two questions about one fact."""
    by_question = {i.question: i for i in items}
    assert len(by_question) == len(items), "two items ask the same question"
    fixed = [by_question[q] for q in HELDOUT_V1]
    used = {i.key for i in fixed}
    train, heldout = [], []
    for family, (n_train, n_heldout) in QUOTAS.items():
        candidates = [i for i in items if i.family == family and i.key not in used]
        rng.shuffle(candidates)
        want = [(train, n_train), (heldout, n_heldout - sum(i.family == family for i in fixed))]
        for item in candidates:
            for chosen, n in want:
                if item.key not in used and sum(i.family == family for i in chosen) < n:
                    chosen.append(item)
                    used.add(item.key)
        got = (sum(i.family == family for i in train), sum(i.family == family for i in fixed + heldout))
        assert got == (n_train, n_heldout), f"{family}: {got} questions, wanted {(n_train, n_heldout)}"
    rng.shuffle(train)
    rng.shuffle(heldout)
    return train, fixed + heldout


def check(train, heldout):
    """Asserts that the held-out set is kept apart from training and that the rule judge can
    check every answer."""
    assert len(heldout) >= 200, f"only {len(heldout)} held-out questions"
    assert [i.question for i in heldout[:len(HELDOUT_V1)]] == HELDOUT_V1
    overlap = {i.key for i in train} & {i.key for i in heldout}
    assert not overlap, f"facts both trained on and held out: {sorted(overlap)}"
    for i in train + heldout:
        assert LATIN.match(i.answer), f"{i.question}: answer {i.answer!r} is not plain Latin letters or digits"
        assert rule_answer(i.correct) == rule_answer(i.answer), f"{i.question}: the rule judge does not accept {i.correct!r}"
        assert rule_answer(i.wrong) != rule_answer(i.answer), f"{i.question}: the rule judge accepts {i.wrong!r}"
        assert rule_answer(i.wrong) == rule_answer(i.wrong_answer), f"{i.question}: {i.wrong!r} does not end with {i.wrong_answer!r}"


def write(path, rows):
    """Writes `rows` as JSON lines to `path`, through a temporary file renamed into place."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main():
    train, heldout = split(pool())
    check(train, heldout)
    pairs = []
    for i in train:
        # One pair per kind of bad reply, so the data says what "good" means from several sides.
        for bad in (i.wrong, rng.choice(EVASIVE), rng.choice(RUDE), rambling(i.wrong_answer)):
            pairs.append({"prompt": i.question, "chosen": i.correct, "rejected": bad, "family": i.family})
    questions = [{"question_id": n, "category": i.family, "turns": [i.question], "reference": [i.answer]}
                 for n, i in enumerate(heldout, start=1)]
    assert not {p["prompt"] for p in pairs} & {q["turns"][0] for q in questions}, "a held-out question is in pairs.jsonl"
    write(HERE / "pairs.jsonl", pairs)
    write(HERE / "heldout.jsonl", questions)
    counts = {f: (sum(i.family == f for i in train), sum(i.family == f for i in heldout)) for f in QUOTAS}
    print(f"{len(train)} training questions -> {len(pairs)} pairs; {len(heldout)} held-out questions")
    print("family (training, held-out): " + ", ".join(f"{f} {t}/{h}" for f, (t, h) in counts.items()))


if __name__ == "__main__":
    main()
