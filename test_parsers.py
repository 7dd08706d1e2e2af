"""
Tests of the parsers of model output (selfplay.first_boxed / parse_clue / parse_vote): a table of
adversarial cases with the value each must give, and a seeded fuzz test that they never raise and
run in linear time on any text a model could emit (random unicode, nested and unclosed boxes,
megabyte strings).

    python -m pytest -q test_parsers.py
"""
import random
import time

import pytest

import selfplay

B = "\\boxed{"


def boxed(content):
    return B + content + "}"


# seats as the model writes them (1-based) -> the parsed vote (0-based seat, "N/A" or None = invalid)
VOTES = [
    # the grammar: "3", "3.", "Player 3", "player 3.", "Player-3", "seat 3"
    (boxed("3"), 2), (boxed("3."), 2), (boxed("Player 3"), 2), (boxed("player 3."), 2),
    (boxed("Player-3"), 2), (boxed("seat 3"), 2), (boxed("SEAT 4"), 3), (boxed("Player 2."), 1),
    (boxed("2."), 1), (boxed(" 1 "), 0), (boxed("{2}"), 1), (boxed("\\text{Player 1}"), 0),
    ("Player 2 looks odd, so \\boxed{4}", 3), (boxed("4") + " " + boxed("1"), 3), (boxed("03"), 2),
    # abstentions in their usual spellings
    (boxed("N/A"), "N/A"), (boxed("n/a"), "N/A"), (boxed("NA"), "N/A"), (boxed(" N / A "), "N/A"),
    (boxed("N/A."), "N/A"), (boxed("N.A."), "N/A"), (boxed("\\text{N/A}"), "N/A"),
    # everything else is invalid
    (boxed("N/A 2"), None), (boxed("not 2, it is 3"), None), (boxed("2 or 3"), None),
    (boxed("seat 1 or 2"), None), (boxed("2.5"), None), (boxed("1e3"), None), (boxed("1-2"), None),
    (boxed("-1"), None), (boxed("\u22121"), None), (boxed("\u20132"), None), (boxed("\uff0d2"), None),
    (boxed("+2"), None), (boxed("5"), None), (boxed("0"), None), (boxed("12"), None),
    (boxed("1" * 5000), None), (boxed("0" * 3000 + "1"), None), (boxed("\u0663"), None),
    (boxed("\uff13"), None), (boxed(""), None), (boxed("spy"), None), (boxed("Player"), None),
    (boxed("2nd"), None), (boxed("Player 3 is the spy"), None), ("3", None), ("", None),
    (B + "3", None), (boxed("na" + " " * 32000 + "x"), None), (boxed("n" + "/" * 1000 + "a"), None),
    (boxed("Player" + " " * 30000 + "x"), None), (boxed("3" + "." * 2), None), (boxed("seat\u200b3"), None),
]

CLUES = [
    ("I see a cube. \\boxed{A red cube on the left.}", "A red cube on the left."),
    (boxed("a set {x} of {y}") + " tail", "a set {x} of {y}"),
    (boxed("Ein grüner Würfel 🟩"), "Ein grüner Würfel 🟩"),
    (boxed("3"), "3"), (boxed("  \u4e09\u4e2a\u7403 "), "\u4e09\u4e2a\u7403"),
    (boxed("   "), None), (boxed("\u200b\u200c\u200d\ufeff"), None), (boxed("\x00\x01\x1b\x7f"), None),
    (boxed("\u200b \x07 \u2060"), None), (boxed("...!?"), None), (boxed("🟩🟥"), None),
    (B + "never closed", None), ("no box at all", None), ("", None),
]


@pytest.mark.parametrize("text, vote", VOTES)
def test_vote_table(text, vote):
    assert selfplay.parse_vote(text, 4) == vote


@pytest.mark.parametrize("text, clue", CLUES)
def test_clue_table(text, clue):
    assert selfplay.parse_clue(text) == clue


def test_the_table_is_adversarial_enough():
    assert len(VOTES) + len(CLUES) >= 40 and sum(v is None for _, v in VOTES) >= 25


@pytest.mark.parametrize("text, content", [
    (boxed("a {b} c") + "}", "a {b} c"), (B + "{{{" + "}", None), ("x \\boxed {1}", None),
    (B + "}" + boxed("2"), ""), ("\\boxed{\\boxed{3}}", "\\boxed{3}"),
])
def test_first_boxed_balances_braces(text, content):
    assert selfplay.first_boxed(text) == content


def random_text(rng, size):
    """Text a broken model might emit: random code points of every plane (surrogates included),
    digits, minus signs, boxes opened, nested and closed at random."""
    pieces = ["\\boxed{", "{", "}", "N/A", "na", " ", "\u2212", "-", ".", "Player", "seat", "\u200b", "\x00"]
    out, length = [], 0
    while length < size:
        roll = rng.random()
        if roll < 0.3:
            piece = rng.choice(pieces)
        elif roll < 0.5:
            piece = "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 12)))
        else:
            piece = "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(1, 20)))
        out.append(piece)
        length += len(piece)
    return "".join(out)


def parse_all(text):
    for n_players in (3, 4, 10):
        vote = selfplay.parse_vote(text, n_players)
        assert vote is None or vote == "N/A" or (isinstance(vote, int) and 0 <= vote < n_players)
    clue = selfplay.parse_clue(text)
    assert clue is None or (isinstance(clue, str) and any(ch.isalnum() for ch in clue))


def test_fuzz_never_raises_and_stays_linear():
    """No exception on 2,000 random texts; and on the worst shapes at 1 MB, under 1 s each
    (0.1 s per 100 KB: generous so that it holds on a loaded machine; linear code takes ~20 ms)."""
    rng = random.Random(11)
    for _ in range(2000):
        parse_all(random_text(rng, rng.randrange(0, 300)))
    megabyte = 1_000_000
    worst = [
        random_text(rng, megabyte),
        B * (megabyte // 7),  # nested boxes that never close
        B + "{" * megabyte,  # unclosed braces
        B + "{}" * (megabyte // 2) + "}",  # balanced, a megabyte long
        boxed("na" + " " * megabyte + "x"),  # the N/A pattern's old quadratic case
        boxed("Player" + " " * megabyte),
        boxed("1" * megabyte),  # Python's int() refuses this many digits
        boxed("-" * megabyte + "1"),
        boxed("\u200b" * megabyte),
        "}" * megabyte + boxed("2"),
    ]
    for text in worst:
        start = time.perf_counter()
        parse_all(text)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.1 * len(text) / 100_000, (text[:30], elapsed)
