"""The demo's language: phrase banks and a small grammar of movie-review requests and reviews
(fluent in three sentiments, or degenerate), split by film title into train and eval titles.
Word lists are chosen so the gold judge's lexicon sees only the sentiment words."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass


def _split(text: str, separator: str | None = None) -> list[str]:
    """A phrase bank written as one string: words split on whitespace, phrases on `separator`."""
    return text.split(separator)


# ---------------------------------------------------------------- phrase banks
# Title, genre, plot and off-topic words are absent from VADER's lexicon (a test checks), so the
# gold score depends only on the opinions a review states.
TITLE_ADJECTIVES = _split(
    "Silent Quiet Hidden Golden Blue Red Iron Paper Glass Stone Distant Northern Last"
    " Second Little Long Winter Summer Midnight Velvet Copper Crimson Hollow Wild"
)
TITLE_NOUNS = _split(
    "River Garden Road House City Island Station Harbor Letter Mirror Window Bridge Train"
    " Clock Forest Ocean Moon Tower Valley Door Lantern Compass Orchard Market"
)
GENRES = _split(
    "drama mystery western musical documentary fantasy animated family spy sports historical"
)
CHARACTERS = _split(
    "young teacher|old farmer|retired sailor|small boy|young girl|city nurse"
    "|quiet detective|travelling singer|young painter|village baker|old pilot"
    "|country doctor",
    "|",
)
PLOTS = _split(
    "returns to a small town|builds a boat with his brother|opens a bakery by the sea"
    "|crosses the country by train|writes letters to a stranger|moves to a new city"
    "|plans a long journey north|joins a band on the road|looks after an old house"
    "|trains for a big race",
    "|",
)
WHEN = ["week", "night", "month", "weekend"]

ASPECTS = _split(
    "acting|story|music|dialogue|ending|pacing|camera work|cast|characters|script|visuals"
    "|soundtrack|direction|lead performance|set design|plot",
    "|",
)
POSITIVE_ADJECTIVES = _split(
    "great good wonderful brilliant superb excellent beautiful lovely charming delightful"
    " fantastic amazing clever strong enjoyable"
)
NEGATIVE_ADJECTIVES = _split(
    "boring dull awful terrible bad weak poor messy lazy painful annoying horrible stupid"
)
PLURAL_ASPECTS = {"characters", "visuals"}
# Negated adjectives by the polarity of the negation: "not bad" is positive, "not good" negative.
NEGATED_ADJECTIVES = {True: ["bad", "boring", "awful"], False: ["good", "great"]}
POSITIVE_VERBS = ["loved", "enjoyed", "liked"]
NEGATIVE_VERBS = ["hated", "disliked"]
BOOSTERS = ["", "", "really ", "very ", "quite "]

OFF_TOPIC_SENTENCES = _split(
    "I bought some bread at the market.|The bus was late this morning."
    "|My neighbour painted the fence blue.|We cooked rice for dinner."
    "|The shop closed early today.|I walked the dog in the park.|It rained all afternoon."
    "|My phone rang twice during lunch.|I watered the plants in the kitchen."
    "|The train to the city was full.",
    "|",
)

PROMPT_TEMPLATES = [
    "Write a short review of {title}, {a_genre} film.",
    "Review the {genre} film {title}.",
    "What did you think of {title}? It is {a_genre} film.",
    "Give a short review of the {genre} movie {title}.",
]

EVAL_TITLE_FRACTION = 0.2  # share of the title pool held out for evaluation prompts
SENTIMENTS = ("positive", "mixed", "negative")
DEGENERATE_KINDS = ("repetition", "truncation", "off_topic")
REVIEW_WORDS = (12, 40)  # inclusive bounds on the length of a fluent review


def _is_eval_title(title: str) -> bool:
    digest = hashlib.sha256(title.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < EVAL_TITLE_FRACTION


ALL_TITLES = [f"The {adjective} {noun}" for adjective in TITLE_ADJECTIVES for noun in TITLE_NOUNS]
EVAL_TITLES = [title for title in ALL_TITLES if _is_eval_title(title)]
TRAIN_TITLES = [title for title in ALL_TITLES if not _is_eval_title(title)]


def distinct_prompt_count(titles: list[str]) -> int:
    """How many different prompts `sample_prompt` can make about these titles."""
    return len(titles) * len(GENRES) * len(PROMPT_TEMPLATES)


# ---------------------------------------------------------------- the grammar
@dataclass(frozen=True)
class FilmPrompt:
    """A prompt and the film it asks about."""

    title: str
    genre: str
    text: str

    def messages(self) -> list[dict[str, str]]:
        """The canonical prompt: one user message."""
        return [{"role": "user", "content": self.text}]


def a_or_an(phrase: str) -> str:
    """`phrase` with its indefinite article: "a drama", "an animated"."""
    return f"{'an' if phrase[0].lower() in 'aeiou' else 'a'} {phrase}"


def sample_prompt(rng: random.Random, titles: list[str]) -> FilmPrompt:
    """A review request for a random film whose title comes from `titles`."""
    title, genre = rng.choice(titles), rng.choice(GENRES)
    template = rng.choice(PROMPT_TEMPLATES)
    return FilmPrompt(
        title, genre, template.format(title=title, genre=genre, a_genre=a_or_an(genre))
    )


def _opening(rng: random.Random, film: FilmPrompt) -> str:
    character, plot = a_or_an(rng.choice(CHARACTERS)), rng.choice(PLOTS)
    return rng.choice(
        [
            f"{film.title} is {a_or_an(film.genre)} film about {character} who {plot}.",
            f"I watched {film.title} last {rng.choice(WHEN)}.",
            f"{film.title} follows {character} who {plot}.",
            f"In {film.title}, {character} {plot}.",
        ]
    )


def _adjective(rng: random.Random, positive: bool) -> str:
    return rng.choice(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES)


def _was(aspect: str) -> str:
    return "were" if aspect in PLURAL_ASPECTS else "was"


def _opinion(rng: random.Random, aspect: str, positive: bool) -> str:
    form = rng.random()
    if form < 0.4:
        return f"The {aspect} {_was(aspect)} {rng.choice(BOOSTERS)}{_adjective(rng, positive)}."
    if form < 0.65:
        first, second = rng.sample(POSITIVE_ADJECTIVES if positive else NEGATIVE_ADJECTIVES, 2)
        return f"The {aspect} felt {first} and {second}."
    if form < 0.9:
        verb = rng.choice(POSITIVE_VERBS if positive else NEGATIVE_VERBS)
        return f"I {rng.choice(['', 'really '])}{verb} the {aspect}."
    # VADER reads "not bad" as mildly positive and "not great" as negative, as a reader would.
    return f"The {aspect} {_was(aspect)} not {rng.choice(NEGATED_ADJECTIVES[positive])}."


def _contrast(rng: random.Random, first: str, second: str, first_positive: bool) -> str:
    return (
        f"The {first} {_was(first)} {_adjective(rng, first_positive)}, "
        f"but the {second} {_was(second)} {_adjective(rng, not first_positive)}."
    )


def _verdict(rng: random.Random, tone: str, film: FilmPrompt) -> str:
    if tone == "positive":
        adjective = _adjective(rng, True)
        options = [
            f"Overall, {a_or_an(adjective)} film, and I would recommend it.",
            "I would happily watch it again.",
            f"{a_or_an(adjective).capitalize()} {film.genre} film.",
        ]
    elif tone == "negative":
        adjective = _adjective(rng, False)
        options = [
            f"Overall, {a_or_an(adjective)} film, and I would not recommend it.",
            "It was a waste of time.",
            f"{a_or_an(adjective).capitalize()} {film.genre} film.",
        ]
    else:
        options = [
            "Overall, it was an okay film.",
            "Some parts worked and some did not.",
            f"It is an average {film.genre} film.",
        ]
    return rng.choice(options)


def fluent_review(rng: random.Random, film: FilmPrompt, sentiment: str) -> str:
    """A well-formed review of `film` (12-40 words): an opening, 1-3 opinions, maybe a verdict.

    Each opinion is positive with probability 0.8-1 in a positive review, 0-0.2 in a negative
    one, 0.3-0.7 in a mixed one, where half the opinions contrast two aspects ("X was A, but
    Y was B"). A verdict agrees with the opinions' majority (mixed reviews: a neutral verdict).
    """
    if sentiment not in SENTIMENTS:
        raise ValueError(f"sentiment must be one of {SENTIMENTS}, got {sentiment!r}.")
    while True:  # rejection sampling keeps reviews short enough for a tiny model
        review = _review_draft(rng, film, sentiment)
        if REVIEW_WORDS[0] <= len(review.split()) <= REVIEW_WORDS[1]:
            return review


def _review_draft(rng: random.Random, film: FilmPrompt, sentiment: str) -> str:
    positive_share = {
        "positive": rng.uniform(0.8, 1.0),
        "mixed": rng.uniform(0.3, 0.7),
        "negative": rng.uniform(0.0, 0.2),
    }[sentiment]
    aspects = rng.sample(ASPECTS, 6)  # no aspect is judged twice in one review
    sentences = [_opening(rng, film)]
    net_opinion = 0
    for _ in range(rng.randint(1, 3)):
        positive = rng.random() < positive_share
        if sentiment == "mixed" and rng.random() < 0.5:
            sentences.append(_contrast(rng, aspects.pop(), aspects.pop(), positive))
        else:
            sentences.append(_opinion(rng, aspects.pop(), positive))
            net_opinion += 1 if positive else -1
    if rng.random() < 0.7:
        tone = "positive" if net_opinion > 0 else "negative" if net_opinion < 0 else "mixed"
        sentences.append(_verdict(rng, "mixed" if sentiment == "mixed" else tone, film))
    return " ".join(sentences)


def degenerate_review(rng: random.Random, film: FilmPrompt, kind: str) -> str:
    """A degenerate response of the given kind: "repetition", "truncation" or "off_topic"."""
    if kind == "repetition":
        positive = rng.random() < 0.5
        if rng.random() < 0.5:
            loop = " ".join([_adjective(rng, positive)] * rng.randint(8, 16))
            return f"{film.title} is {loop}."
        sentence = _opinion(rng, rng.choice(ASPECTS), positive)
        repeats = min(rng.randint(3, 6), REVIEW_WORDS[1] // len(sentence.split()))
        return " ".join([sentence] * repeats)
    if kind == "truncation":
        words = fluent_review(rng, film, rng.choice(SENTIMENTS)).split()
        kept = words[: rng.randint(max(8, int(0.4 * len(words))), len(words) - 1)]
        return " ".join(kept).rstrip(".,!?")
    if kind == "off_topic":
        return " ".join(rng.sample(OFF_TOPIC_SENTENCES, rng.randint(3, 5)))
    raise ValueError(f"degenerate kind must be one of {DEGENERATE_KINDS}, got {kind!r}.")
