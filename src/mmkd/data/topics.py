"""Generated topic sentences: a small text-classification set that needs no download.

Each row is one sentence about one of four topics (sport, weather, food, music). A
sentence is built from a template, two words of its topic, and everyday words shared by
all topics. Some sentences carry one word of another topic in place of the second, so a
model has to weigh the evidence rather than look up a single word.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from mmkd.manifest import write_manifest

TOPIC_WORDS = {
    "sport": ["football", "tennis", "goal", "match", "referee", "stadium", "coach", "team", "marathon", "score",
              "league", "tournament", "striker", "racket", "medal"],
    "weather": ["rain", "storm", "sunshine", "forecast", "snow", "wind", "cloud", "thunder", "fog", "temperature",
                "frost", "humidity", "drizzle", "heatwave", "breeze"],
    "food": ["bread", "soup", "recipe", "cheese", "kitchen", "dinner", "oven", "salad", "pasta", "breakfast",
             "spice", "dessert", "bakery", "vegetables", "sauce"],
    "music": ["guitar", "concert", "melody", "piano", "album", "song", "orchestra", "drummer", "singer", "chorus",
              "violin", "rhythm", "band", "lyrics", "jazz"],
}
TEMPLATES = [
    "yesterday the {a} was the only thing anyone talked about",
    "my neighbour told me about the {a} and the {b}",
    "we read an article on the {a} this morning",
    "the {a} near the station surprised everyone",
    "she could not stop thinking about the {a} and the {b} all week",
    "nobody expected the {a} to matter so much today",
    "there was a long discussion about the {a} at work",
    "after lunch we heard news about the {a} and the {b}",
]


def topic_sentence(topic: str, rng: random.Random, *, distractor_rate: float) -> str:
    """Return one sentence about `topic`, sometimes with a word of another topic in place of the second."""
    words = TOPIC_WORDS[topic]
    a, b = rng.sample(words, 2)
    if rng.random() < distractor_rate:
        other = rng.choice([t for t in TOPIC_WORDS if t != topic])
        b = rng.choice(TOPIC_WORDS[other])
    return rng.choice(TEMPLATES).format(a=a, b=b)


def build_topics(out: Path, *, rows_per_topic: int = 300, seed: int = 0, distractor_rate: float = 0.3) -> Path:
    """Write `out`/manifest.csv with `rows_per_topic` generated sentences per topic; return its path.

    Rows get a split by their position: 70% train, 15% validation and 15% test of each topic.
    """
    rng = random.Random(seed)
    rows = []
    for topic in TOPIC_WORDS:
        for index in range(rows_per_topic):
            fraction = index / rows_per_topic
            split = "train"
            if fraction >= 0.85:
                split = "test"
            elif fraction >= 0.7:
                split = "val"
            rows.append({"id": f"{topic}-{index:05d}", "label": topic, "split": split,
                         "text": topic_sentence(topic, rng, distractor_rate=distractor_rate)})
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.csv"
    write_manifest(pd.DataFrame(rows), path)
    return path
