"""Write the signal benchmarks' data files into benchmarks/signals/data/ (train and held-out).

    python benchmarks/signals/make_data.py          # rewrites the files; the output is committed

Everything here was written for these benchmarks (nothing is copied from recipes/data):

- rewards: one-step arithmetic word problems (add, subtract, multiply, divide), numbers drawn
  with a fixed seed; held-out problems never repeat a training prompt. Held-out lines carry a
  worked answer as `demonstration`, so the episode's eval also reports the teacher's ceiling
  (the model with a correct answer in its prompt, which is what a successful sibling gives it).
- feedback: small Python functions, each with three tests for the `python_tests` environment;
  held-out lines are other functions, with a reference solution as `demonstration` (the ceiling).
- interactions: chat logs where the assistant answers at length and the user's follow-up always
  asks for a shorter answer; held-out questions have a known short answer, so the eval can check
  that a shorter reply still answers (`contains`), while the runner reads the length. The
  held-out questions are also written through the interactions teacher's hindsight template with
  a "shorter" follow-up (`interactions_heldout_hindsight.jsonl`): the bare base on it is the
  teacher's ceiling.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"
sys.path.insert(0, str(HERE.parent.parent))

from sdcli.recipe.signal_sections import DEFAULT_HINDSIGHT_TEMPLATE  # noqa: E402

# ---------------------------------------------------------------------------------------------
# rewards: arithmetic word problems

# "Show the calculation": asked to answer briefly, the base mostly repeats a number from the question
# (3 of 30 right at base); asked to show the calculation it gets 6 of 30 (base_rate.py, 2026-11-29)
SUFFIX = ' Show the calculation, then end with "The answer is N." where N is a whole number.'
NAMES = ["Lena", "Omar", "Priya", "Jonas", "Mei", "Carlos", "Ada", "Tariq", "Nora", "Felix", "Ines", "Kofi",
         "Hana", "Diego", "Zoe", "Ravi", "Elsa", "Malik", "Yuki", "Bruno"]
ITEMS = ["stickers", "marbles", "cookies", "stamps", "shells", "pencils", "cards", "beads", "apples", "coins"]

# (operation, template): {n} a name, {i} items, {a} {b} the numbers; the answer is op(a, b)
TEMPLATES = [
    ("+", "{n} has {a} {i}. A friend gives {n} {b} more {i}. How many {i} does {n} have now?"),
    ("+", "A bus carries {a} passengers. At the next stop {b} more people get on and nobody gets off. How many passengers are on the bus now?"),
    ("+", "{n} walked {a} meters in the morning and {b} meters in the evening. How many meters did {n} walk in total?"),
    ("-", "A jar holds {a} {i}. {n} takes {b} of them out. How many {i} are left in the jar?"),
    ("-", "{n} had {a} dollars and spent {b} dollars on a book. How many dollars does {n} have left?"),
    ("-", "A school has {a} students. {b} of them are on a trip today. How many students are at school today?"),
    ("*", "{n} buys {a} boxes of {i}. Each box holds {b} {i}. How many {i} does {n} buy?"),
    ("*", "A garden has {a} rows of tulips with {b} tulips in each row. How many tulips are in the garden?"),
    ("*", "{n} reads {b} pages every day. How many pages does {n} read in {a} days?"),
    ("/", "{n} shares {a} {i} equally among {b} friends. How many {i} does each friend get?"),
    ("/", "A baker puts {a} rolls into bags of {b} rolls each. How many bags does the baker fill?"),
]


def numbers(op: str, rng: random.Random) -> tuple[int, int, int]:
    """Two-digit and one-digit numbers: with two two-digit numbers the base got 1 of 30 right."""
    if op == "+":
        a, b = rng.randint(11, 40), rng.randint(2, 9)
        return a, b, a + b
    if op == "-":
        a, b = rng.randint(20, 50), rng.randint(2, 9)
        return a, b, a - b
    if op == "*":
        a, b = rng.randint(2, 6), rng.randint(3, 9)
        return a, b, a * b
    b, q = rng.randint(2, 6), rng.randint(2, 9)
    return b * q, b, q


SYMBOL = {"+": "+", "-": "-", "*": "x", "/": "/"}


def arithmetic(count: int, seed: int, taken: set[str]) -> list[dict]:
    rng = random.Random(seed)
    rows: list[dict] = []
    while len(rows) < count:
        op, template = TEMPLATES[len(rows) % len(TEMPLATES)]
        a, b, answer = numbers(op, rng)
        prompt = template.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b) + SUFFIX
        if prompt in taken:
            continue
        taken.add(prompt)
        rows.append({"prompt": prompt, "answer": answer,
                     "demonstration": f"{a} {SYMBOL[op]} {b} = {answer}. The answer is {answer}."})
    return rows


# ---------------------------------------------------------------------------------------------
# feedback: small Python functions with tests

def task(name: str, signature: str, what: str, tests: list[tuple[str, str]], solution: str) -> dict:
    prompt = (f"Write a Python function `{signature}` that {what}. "
              f"Reply with a single ```python code block that defines `{name}`.")
    return {"id": f"py-{name}", "prompt": prompt, "entry_point": name,
            "tests": [{"input": i, "expected": e} for i, e in tests],
            "demonstration": f"```python\n{solution.strip()}\n```"}


PY_TRAIN = [
    task("triple", "triple(n)", "returns n multiplied by 3",
         [("triple(2)", "6"), ("triple(0)", "0"), ("triple(-4)", "-12")], "def triple(n):\n    return n * 3"),
    task("subtract", "subtract(a, b)", "returns a minus b",
         [("subtract(5, 3)", "2"), ("subtract(0, 4)", "-4"), ("subtract(10, 10)", "0")], "def subtract(a, b):\n    return a - b"),
    task("is_positive", "is_positive(n)", "returns True if n is greater than zero and False otherwise",
         [("is_positive(3)", "True"), ("is_positive(0)", "False"), ("is_positive(-2)", "False")],
         "def is_positive(n):\n    return n > 0"),
    task("first_item", "first_item(items)", "returns the first element of the list items",
         [("first_item([4, 5, 6])", "4"), ("first_item(['a'])", "'a'"), ("first_item([0, 1])", "0")],
         "def first_item(items):\n    return items[0]"),
    task("string_length", "string_length(s)", "returns the number of characters in the string s",
         [("string_length('abc')", "3"), ("string_length('')", "0"), ("string_length('hello world')", "11")],
         "def string_length(s):\n    return len(s)"),
    task("to_upper", "to_upper(s)", "returns the string s in upper case",
         [("to_upper('abc')", "'ABC'"), ("to_upper('Hi there')", "'HI THERE'"), ("to_upper('')", "''")],
         "def to_upper(s):\n    return s.upper()"),
    task("list_sum", "list_sum(numbers)", "returns the sum of the numbers in the list",
         [("list_sum([1, 2, 3])", "6"), ("list_sum([])", "0"), ("list_sum([-1, 1, 5])", "5")],
         "def list_sum(numbers):\n    return sum(numbers)"),
    task("smallest", "smallest(numbers)", "returns the smallest number in a non-empty list",
         [("smallest([3, 1, 2])", "1"), ("smallest([7])", "7"), ("smallest([-5, 0, 5])", "-5")],
         "def smallest(numbers):\n    return min(numbers)"),
    task("cube", "cube(n)", "returns n to the power of 3",
         [("cube(2)", "8"), ("cube(0)", "0"), ("cube(-3)", "-27")], "def cube(n):\n    return n ** 3"),
    task("average", "average(a, b)", "returns the average of the two numbers a and b",
         [("average(2, 4)", "3"), ("average(1, 2)", "1.5"), ("average(-2, 2)", "0")],
         "def average(a, b):\n    return (a + b) / 2"),
    task("is_odd", "is_odd(n)", "returns True if the integer n is odd and False otherwise",
         [("is_odd(3)", "True"), ("is_odd(4)", "False"), ("is_odd(0)", "False")], "def is_odd(n):\n    return n % 2 == 1"),
    task("greet", "greet(name)", "returns the string 'Hello, ' followed by name",
         [("greet('Ann')", "'Hello, Ann'"), ("greet('Bo')", "'Hello, Bo'"), ("greet('')", "'Hello, '")],
         "def greet(name):\n    return 'Hello, ' + name"),
    task("count_items", "count_items(items)", "returns how many elements the list items has",
         [("count_items([1, 2, 3])", "3"), ("count_items([])", "0"), ("count_items(['x'])", "1")],
         "def count_items(items):\n    return len(items)"),
    task("half", "half(n)", "returns n divided by 2",
         [("half(4)", "2"), ("half(3)", "1.5"), ("half(0)", "0")], "def half(n):\n    return n / 2"),
    task("biggest", "biggest(a, b)", "returns the larger of the two numbers a and b",
         [("biggest(3, 9)", "9"), ("biggest(5, 2)", "5"), ("biggest(-1, -4)", "-1")],
         "def biggest(a, b):\n    return max(a, b)"),
    task("repeat_word", "repeat_word(word, n)", "returns the string word repeated n times",
         [("repeat_word('ab', 3)", "'ababab'"), ("repeat_word('x', 1)", "'x'"), ("repeat_word('hi', 0)", "''")],
         "def repeat_word(word, n):\n    return word * n"),
    task("remainder", "remainder(a, b)", "returns the remainder when a is divided by b",
         [("remainder(7, 3)", "1"), ("remainder(10, 5)", "0"), ("remainder(9, 4)", "1")],
         "def remainder(a, b):\n    return a % b"),
    task("square_list", "square_list(numbers)", "returns a new list with every number squared",
         [("square_list([1, 2, 3])", "[1, 4, 9]"), ("square_list([])", "[]"), ("square_list([-2])", "[4]")],
         "def square_list(numbers):\n    return [n * n for n in numbers]"),
    task("starts_with_a", "starts_with_a(s)", "returns True if the string s starts with the letter 'a' and False otherwise",
         [("starts_with_a('apple')", "True"), ("starts_with_a('banana')", "False"), ("starts_with_a('')", "False")],
         "def starts_with_a(s):\n    return s.startswith('a')"),
    task("absolute", "absolute(n)", "returns the absolute value of n",
         [("absolute(-3)", "3"), ("absolute(4)", "4"), ("absolute(0)", "0")], "def absolute(n):\n    return abs(n)"),
    task("join_words", "join_words(words)", "returns the strings in the list words joined with single spaces",
         [("join_words(['a', 'b'])", "'a b'"), ("join_words(['hi'])", "'hi'"), ("join_words([])", "''")],
         "def join_words(words):\n    return ' '.join(words)"),
    task("product", "product(a, b, c)", "returns the product of the three numbers a, b and c",
         [("product(1, 2, 3)", "6"), ("product(2, 0, 5)", "0"), ("product(-1, 2, 2)", "-4")],
         "def product(a, b, c):\n    return a * b * c"),
    task("reverse_list", "reverse_list(items)", "returns a new list with the elements of items in reverse order",
         [("reverse_list([1, 2, 3])", "[3, 2, 1]"), ("reverse_list([])", "[]"), ("reverse_list(['a', 'b'])", "['b', 'a']")],
         "def reverse_list(items):\n    return items[::-1]"),
    task("minutes_to_seconds", "minutes_to_seconds(m)", "returns the number of seconds in m minutes",
         [("minutes_to_seconds(1)", "60"), ("minutes_to_seconds(0)", "0"), ("minutes_to_seconds(3)", "180")],
         "def minutes_to_seconds(m):\n    return m * 60"),
]

PY_HELDOUT = [
    task("quadruple", "quadruple(n)", "returns n multiplied by 4",
         [("quadruple(2)", "8"), ("quadruple(0)", "0"), ("quadruple(-3)", "-12")], "def quadruple(n):\n    return n * 4"),
    task("multiply", "multiply(a, b)", "returns a times b",
         [("multiply(3, 4)", "12"), ("multiply(0, 7)", "0"), ("multiply(-2, 5)", "-10")],
         "def multiply(a, b):\n    return a * b"),
    task("is_negative", "is_negative(n)", "returns True if n is less than zero and False otherwise",
         [("is_negative(-1)", "True"), ("is_negative(0)", "False"), ("is_negative(5)", "False")],
         "def is_negative(n):\n    return n < 0"),
    task("last_item", "last_item(items)", "returns the last element of the non-empty list items",
         [("last_item([4, 5, 6])", "6"), ("last_item(['a'])", "'a'"), ("last_item([0, 1])", "1")],
         "def last_item(items):\n    return items[-1]"),
    task("to_lower", "to_lower(s)", "returns the string s in lower case",
         [("to_lower('ABC')", "'abc'"), ("to_lower('Hi There')", "'hi there'"), ("to_lower('')", "''")],
         "def to_lower(s):\n    return s.lower()"),
    task("largest", "largest(numbers)", "returns the largest number in a non-empty list",
         [("largest([3, 1, 2])", "3"), ("largest([7])", "7"), ("largest([-5, 0, -1])", "0")],
         "def largest(numbers):\n    return max(numbers)"),
    task("square", "square(n)", "returns n multiplied by itself",
         [("square(3)", "9"), ("square(0)", "0"), ("square(-4)", "16")], "def square(n):\n    return n * n"),
    task("is_even", "is_even(n)", "returns True if the integer n is even and False otherwise",
         [("is_even(4)", "True"), ("is_even(7)", "False"), ("is_even(0)", "True")], "def is_even(n):\n    return n % 2 == 0"),
    task("add_one", "add_one(n)", "returns n plus 1",
         [("add_one(1)", "2"), ("add_one(-1)", "0"), ("add_one(99)", "100")], "def add_one(n):\n    return n + 1"),
    task("list_length", "list_length(items)", "returns the number of elements in the list items",
         [("list_length([1, 2])", "2"), ("list_length([])", "0"), ("list_length(['a', 'b', 'c'])", "3")],
         "def list_length(items):\n    return len(items)"),
    task("smaller", "smaller(a, b)", "returns the smaller of the two numbers a and b",
         [("smaller(3, 9)", "3"), ("smaller(5, 2)", "2"), ("smaller(-1, -4)", "-4")],
         "def smaller(a, b):\n    return min(a, b)"),
    task("reverse_string", "reverse_string(s)", "returns the string s reversed",
         [("reverse_string('abc')", "'cba'"), ("reverse_string('')", "''"), ("reverse_string('ab')", "'ba'")],
         "def reverse_string(s):\n    return s[::-1]"),
    task("double_list", "double_list(numbers)", "returns a new list with every number multiplied by 2",
         [("double_list([1, 2, 3])", "[2, 4, 6]"), ("double_list([])", "[]"), ("double_list([-1])", "[-2]")],
         "def double_list(numbers):\n    return [n * 2 for n in numbers]"),
    task("hours_to_minutes", "hours_to_minutes(h)", "returns the number of minutes in h hours",
         [("hours_to_minutes(1)", "60"), ("hours_to_minutes(0)", "0"), ("hours_to_minutes(2)", "120")],
         "def hours_to_minutes(h):\n    return h * 60"),
    task("add_three", "add_three(a, b, c)", "returns the sum of the three numbers a, b and c",
         [("add_three(1, 2, 3)", "6"), ("add_three(0, 0, 0)", "0"), ("add_three(-1, 1, 5)", "5")],
         "def add_three(a, b, c):\n    return a + b + c"),
    task("is_zero", "is_zero(n)", "returns True if n equals zero and False otherwise",
         [("is_zero(0)", "True"), ("is_zero(3)", "False"), ("is_zero(-2)", "False")], "def is_zero(n):\n    return n == 0"),
    task("concat", "concat(a, b)", "returns the string a followed by the string b",
         [("concat('ab', 'cd')", "'abcd'"), ("concat('', 'x')", "'x'"), ("concat('hi', '')", "'hi'")],
         "def concat(a, b):\n    return a + b"),
    task("spread", "spread(numbers)", "returns the largest number minus the smallest number of a non-empty list",
         [("spread([3, 1, 2])", "2"), ("spread([5])", "0"), ("spread([-2, 4])", "6")],
         "def spread(numbers):\n    return max(numbers) - min(numbers)"),
    task("negate", "negate(n)", "returns n with its sign flipped",
         [("negate(3)", "-3"), ("negate(-2)", "2"), ("negate(0)", "0")], "def negate(n):\n    return -n"),
    task("count_a", "count_a(s)", "returns how many times the letter 'a' appears in the string s",
         [("count_a('banana')", "3"), ("count_a('xyz')", "0"), ("count_a('a')", "1")], "def count_a(s):\n    return s.count('a')"),
]


# ---------------------------------------------------------------------------------------------
# interactions: the user keeps asking for shorter answers

SHORTER = [
    "Too long. Just give me the short answer.",
    "Shorter please, one sentence is enough.",
    "That's way too much text. Can you keep it brief?",
    "I only needed the answer, not an essay. Shorter.",
    "Please be more concise, just the key point.",
    "Too wordy. Answer in one short sentence.",
    "Can you cut that down? I just want the answer.",
    "Less detail please, keep it to a line.",
]

# (question, a long logged reply); the user asked for less every time
CHATS = [
    ("What is the boiling point of water at sea level?",
     "Water boils at 100 degrees Celsius, or 212 degrees Fahrenheit, at sea level. This is because at that temperature the vapour pressure of water equals the atmospheric pressure. At higher altitudes the air pressure is lower, so water boils at a lower temperature, which is why cooking pasta in the mountains takes longer. Adding salt raises the boiling point slightly."),
    ("Who painted the Mona Lisa?",
     "The Mona Lisa was painted by Leonardo da Vinci, the Italian Renaissance artist, scientist and inventor. He worked on it in the early sixteenth century, probably between 1503 and 1519. The portrait is believed to show Lisa Gherardini, the wife of a Florentine merchant. Today it hangs in the Louvre in Paris, where millions of visitors see it every year behind protective glass."),
    ("How many continents are there?",
     "There are seven continents by the most common convention: Africa, Antarctica, Asia, Australia (or Oceania), Europe, North America and South America. However, different parts of the world teach different models. Some combine Europe and Asia into Eurasia, and some combine North and South America into a single continent, which gives five or six continents instead of seven."),
    ("What gas do plants absorb from the air?",
     "Plants absorb carbon dioxide from the air. During photosynthesis, they take in carbon dioxide through small pores in their leaves called stomata, and they use the energy of sunlight to combine it with water. This produces glucose, which the plant uses for energy and growth, and releases oxygen as a by-product, which is why forests are so important for the air we breathe."),
    ("What is the chemical symbol for gold?",
     "The chemical symbol for gold is Au. It comes from the Latin word aurum, which means gold. Gold has the atomic number 79 and is one of the least reactive metals, which is why it does not rust or tarnish. It has been used for jewellery, coins and decoration for thousands of years, and today it is also used in electronics because it conducts electricity well."),
    ("How many legs does a spider have?",
     "A spider has eight legs. Spiders belong to the class of arachnids, which also includes scorpions, ticks and mites, and all of them have eight legs rather than the six legs of insects. Each leg has seven segments. Spiders also have two small appendages near the mouth called pedipalps, which look like short legs but are used for sensing and handling food."),
    ("Which planet is closest to the Sun?",
     "Mercury is the planet closest to the Sun. It orbits at an average distance of about 58 million kilometres and completes one orbit every 88 Earth days. Because it has almost no atmosphere to hold heat, its temperature swings from about 430 degrees Celsius during the day to minus 180 degrees at night. It is also the smallest planet in our solar system."),
    ("What language is spoken in Brazil?",
     "The official language of Brazil is Portuguese. Brazil was a Portuguese colony from 1500 until its independence in 1822, which is why it speaks Portuguese while most of its neighbours speak Spanish. Brazilian Portuguese differs from the Portuguese of Portugal in pronunciation and some vocabulary. Many indigenous languages are also spoken in Brazil, as well as German and Italian in some communities."),
    ("How many hours are in a day?",
     "There are 24 hours in a day. This division goes back to the ancient Egyptians, who split the day and the night into twelve parts each. A day is the time it takes the Earth to spin once on its axis relative to the Sun. Each hour has 60 minutes and each minute has 60 seconds, so a day has 86,400 seconds in total."),
    ("What is the largest mammal?",
     "The largest mammal is the blue whale. It can grow to about 30 metres long and weigh up to 190 tonnes, which makes it the largest animal known to have ever lived, larger than any dinosaur. Blue whales feed almost entirely on tiny shrimp-like animals called krill, eating several tonnes a day. Their heart alone is about the size of a small car."),
    ("What is the freezing point of water in Fahrenheit?",
     "Water freezes at 32 degrees Fahrenheit, which is 0 degrees Celsius. The Fahrenheit scale was proposed by Daniel Gabriel Fahrenheit in 1724. On this scale water boils at 212 degrees, so there are 180 degrees between freezing and boiling. Salt water freezes at a lower temperature, which is why salt is spread on icy roads in winter."),
    ("Who wrote Romeo and Juliet?",
     "Romeo and Juliet was written by William Shakespeare, the English playwright and poet. It was probably written around 1595 and tells the story of two young lovers from feuding families in Verona, Italy. The play is one of the most performed plays in the world and has inspired countless films, ballets, operas and musicals, including West Side Story."),
    ("What is the capital of Japan?",
     "The capital of Japan is Tokyo. It became the capital in 1868, when the emperor moved there from Kyoto and the city, then called Edo, was renamed Tokyo, which means eastern capital. The Greater Tokyo Area is the most populous metropolitan area in the world, with more than 37 million people. It is a centre of finance, technology and culture."),
    ("How many sides does a hexagon have?",
     "A hexagon has six sides. The word comes from the Greek words hex, meaning six, and gonia, meaning angle. A regular hexagon has six equal sides and six equal angles of 120 degrees each. Hexagons appear often in nature, most famously in the cells of a honeycomb, because they fill a flat surface without gaps while using very little material."),
    ("What is the hardest natural substance?",
     "Diamond is the hardest natural substance. It is made of carbon atoms arranged in a very strong crystal structure, where each atom is bonded to four others. Diamonds form deep inside the Earth under high pressure and temperature over millions of years. Because of their hardness they are used in cutting and drilling tools, as well as in jewellery."),
    ("Which organ pumps blood through the body?",
     "The heart pumps blood through the body. It is a muscular organ about the size of a fist, located in the chest between the lungs. It has four chambers: two atria that receive blood and two ventricles that pump it out. The right side sends blood to the lungs to pick up oxygen, and the left side pumps oxygen-rich blood to the rest of the body."),
    ("What is the square root of 81?",
     "The square root of 81 is 9, because 9 multiplied by 9 equals 81. Strictly speaking, minus 9 is also a square root of 81, since minus 9 times minus 9 is also 81, but the principal square root, which is what the square root symbol means, is the positive one. 81 is a perfect square, and it is also 3 to the power of 4."),
    ("What is the longest river in Africa?",
     "The longest river in Africa is the Nile. It flows north for about 6,650 kilometres through eleven countries, including Uganda, Sudan and Egypt, before emptying into the Mediterranean Sea. It has two main branches, the White Nile and the Blue Nile, which meet at Khartoum. For thousands of years its floods made the land along its banks fertile for farming."),
    ("In which country are the pyramids of Giza?",
     "The pyramids of Giza are in Egypt, on the outskirts of Cairo. The largest of them, the Great Pyramid, was built for the pharaoh Khufu around 2560 BC and was the tallest man-made structure in the world for more than 3,800 years. Next to the pyramids stands the Great Sphinx. The site is one of the most visited tourist attractions in the world."),
    ("How many minutes are in an hour?",
     "There are 60 minutes in an hour. The use of 60 goes back to the ancient Babylonians, who counted in base 60, probably because 60 can be divided evenly by many numbers, such as 2, 3, 4, 5, 6, 10, 12, 15, 20 and 30. The same system gives us 60 seconds in a minute and 360 degrees in a circle."),
    ("What colour do you get by mixing blue and yellow?",
     "Mixing blue and yellow gives green. This is true for paints and other pigments, which work by subtractive mixing: each pigment absorbs some colours of light, and the mixture reflects only what neither absorbs, which is mostly green. With light, the rules are different: mixing blue and yellow light gives something close to white, because light mixes additively."),
    ("Who was the first person to walk on the Moon?",
     "The first person to walk on the Moon was Neil Armstrong, an American astronaut. He stepped onto the lunar surface on 20 July 1969 during the Apollo 11 mission, saying the famous words that it was one small step for man, one giant leap for mankind. Buzz Aldrin joined him about twenty minutes later, while Michael Collins stayed in orbit in the command module."),
    ("What is the main ingredient of guacamole?",
     "The main ingredient of guacamole is avocado. The avocados are mashed and usually mixed with lime juice, salt, onion, tomato, coriander and chilli. Guacamole comes from Mexico, where it was first made by the Aztecs hundreds of years ago. The lime juice adds flavour and also slows down browning, which happens when the avocado flesh reacts with oxygen in the air."),
    ("How many players are on a football team on the field?",
     "In association football, or soccer, each team has eleven players on the field at a time, one of whom is the goalkeeper. The other ten are usually arranged as defenders, midfielders and forwards in formations such as 4-4-2 or 4-3-3. A team may also make a limited number of substitutions during a match, usually five in professional competitions today."),
    ("What is the smallest prime number?",
     "The smallest prime number is 2. A prime number is a whole number greater than 1 that has exactly two divisors, 1 and itself. The number 2 is also the only even prime number, because every other even number can be divided by 2. The number 1 is not considered prime, because it has only one divisor, which keeps the factorisation of numbers unique."),
    ("Which metal is liquid at room temperature?",
     "Mercury is the metal that is liquid at room temperature. It melts at about minus 39 degrees Celsius, so it stays liquid under normal conditions. It was once widely used in thermometers and barometers because it expands evenly with heat, but it is toxic, so it has largely been replaced. Gallium and caesium melt just above room temperature, on a warm day or in your hand."),
    ("What do bees make?",
     "Bees make honey. Honeybees collect nectar from flowers, bring it back to the hive and pass it between workers, adding enzymes that break down its sugars. They then store it in wax cells and fan it with their wings until most of the water evaporates, which turns it into honey. Bees also make beeswax, which they produce from glands on their bodies to build the honeycomb."),
    ("How many days are in a leap year?",
     "A leap year has 366 days instead of the usual 365. The extra day is added to February, which then has 29 days. Leap years exist because a year, the time the Earth takes to orbit the Sun, is about 365.24 days long. Adding a day every four years keeps the calendar in step with the seasons, with some exceptions for years divisible by 100 but not by 400."),
    ("What is the tallest mountain in the world?",
     "The tallest mountain in the world, measured from sea level, is Mount Everest. Its summit is about 8,849 metres above sea level. It lies in the Himalayas on the border between Nepal and China. It was first climbed in 1953 by Edmund Hillary and Tenzing Norgay. If measured from base to peak instead, Mauna Kea in Hawaii is taller, but most of it is underwater."),
    ("What instrument has 88 keys?",
     "The piano has 88 keys: 52 white keys and 36 black keys, which together cover just over seven octaves. The modern piano was developed from the harpsichord by Bartolomeo Cristofori in Italy around 1700. Unlike a harpsichord, which plucks its strings, a piano strikes them with felt-covered hammers, so the player can play softly or loudly, which is where its full name, pianoforte, comes from."),
    ("What is the opposite of north?",
     "The opposite of north is south. North and south are the two directions along the Earth's axis of rotation, and a compass needle points roughly north because it lines up with the Earth's magnetic field. East and west are at right angles to them. On most maps north is at the top, which is a convention that became common in Europe during the Renaissance."),
    ("Which bird is a symbol of peace?",
     "The dove is a symbol of peace, usually shown as a white dove carrying an olive branch in its beak. The image goes back to the story of Noah's ark, in which a dove returns with an olive leaf to show that the flood is over. In the twentieth century Pablo Picasso drew a famous dove for a peace congress in 1949, which made it a symbol of peace movements worldwide."),
]

# held-out: (question, the short answer a reply must still contain)
HELDOUT_QA = [
    ("What is the largest ocean on Earth?", "Pacific"),
    ("Which planet is known as the Red Planet?", "Mars"),
    ("Who wrote the play Hamlet?", "Shakespeare"),
    ("What is the capital of Italy?", "Rome"),
    ("How many legs does an insect have?", "six|6"),
    ("What is the chemical symbol for water?", "H2O"),
    ("Which animal is known as the king of the jungle?", "lion"),
    ("What is the largest planet in our solar system?", "Jupiter"),
    ("In which country is the Eiffel Tower?", "France"),
    ("What do caterpillars turn into?", "butterfl"),
    ("How many days are in a week?", "seven|7"),
    ("What is the fastest land animal?", "cheetah"),
    ("Which gas do humans need to breathe to live?", "oxygen"),
    ("What is frozen water called?", "ice"),
    ("Who discovered penicillin?", "Fleming"),
    ("What is the capital of Canada?", "Ottawa"),
    ("Which continent is Kenya in?", "Africa"),
    ("How many strings does a standard guitar have?", "six|6"),
    ("What is the main language spoken in Mexico?", "Spanish"),
    ("Which organ do we use to breathe?", "lung"),
]


def chats() -> list[dict]:
    rows = []
    for i, (question, reply) in enumerate(CHATS):
        rows.append({"id": f"short-{i + 1:02d}", "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": SHORTER[i % len(SHORTER)]},
        ]})
    return rows


def qa_line(i: int, question: str, answer: str) -> dict:
    row = {"id": f"ask-{i + 1:02d}", "prompt": question, "answer": answer}
    if "|" in answer:  # either spelling counts
        row.update(answer=rf"\b({answer})\b", reward="regex")
    return row


HINDSIGHT_FOLLOWUP = "Too long. Just give me the short answer."


def files() -> dict[str, list[dict]]:
    """File name -> its lines."""
    taken: set[str] = set()
    heldout = arithmetic(30, seed=1, taken=taken)
    # each held-out line names its scorer: the recipe's eval.reward (contains) is for the general questions
    heldout = [{"id": f"wp-eval-{i + 1:02d}", **r, "reward": "numeric"} for i, r in enumerate(heldout)]
    train = [{"id": f"wp-{i + 1:02d}", "prompt": r["prompt"], "answer": r["answer"]}
             for i, r in enumerate(arithmetic(44, seed=2, taken=taken))]
    qa = [qa_line(i, q, a) for i, (q, a) in enumerate(HELDOUT_QA)]
    hindsight = [{**row, "id": row["id"] + "-hindsight",
                  "prompt": DEFAULT_HINDSIGHT_TEMPLATE.format(prompt=row["prompt"], followup=HINDSIGHT_FOLLOWUP)}
                 for row in qa]
    return {
        "rewards_train.jsonl": train,
        "rewards_heldout.jsonl": heldout,
        "feedback_train.jsonl": [{k: v for k, v in t.items() if k != "demonstration"} for t in PY_TRAIN],
        "feedback_heldout.jsonl": [{**t, "reward": "benchmarks.signals.scorers:passes_tests"} for t in PY_HELDOUT],
        "interactions_train.jsonl": chats(),
        "interactions_heldout.jsonl": qa,
        "interactions_heldout_hindsight.jsonl": hindsight,
    }


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def main() -> None:
    DATA.mkdir(exist_ok=True)
    for name, rows in files().items():
        path, text = DATA / name, jsonl(rows)
        if path.is_file() and path.read_text() == text:
            continue  # untouched, so a run reading it is not disturbed (sd stops when its data file changes)
        path.write_text(text)
        print(f"{path}: {len(rows)} lines")


if __name__ == "__main__":
    main()
