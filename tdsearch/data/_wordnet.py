"""WordNet glosses, a real text task that installs as a Debian package (``wordnet-base``).

Each of WordNet 3.0's 117,659 synsets has a gloss (its definition and usage examples) and a
lexicographer file (noun.animal, verb.motion, adj.all, ...: 45 classes). The task: read the
gloss, name the lexicographer file. Splits are fixed by a hash of the synset's offset and part
of speech (80 / 10 / 10); the vocabulary is the 8,000 most frequent words of the training
glosses (0 = padding, 1 = unknown word); a gloss is its first 32 words, padded at the front so
that a recurrent model's last step reads the last word.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from tdsearch.errors import UserError

WORDNET_DEBIAN_DIR = Path("/usr/share/wordnet")
PARTS_OF_SPEECH = ("noun", "verb", "adj", "adv")
#: WordNet's lexicographer files, by number (lexnames(5WN)).
LEXNAMES = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
VOCABULARY = 8000
#: embedding rows: the vocabulary plus padding (0) and unknown (1)
VOCABULARY_ROWS = VOCABULARY + 2
TOKENS = 32
PAD, UNKNOWN = 0, 1
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def read_glosses(directory: Path) -> list[tuple[str, int, str]]:
    """(synset key, lexicographer file number, gloss) of every synset in WordNet's data files."""
    synsets = []
    for pos in PARTS_OF_SPEECH:
        path = directory / f"data.{pos}"
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("  "):  # the license header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                if len(fields) < 2 or not gloss:
                    continue
                synsets.append((f"{pos}:{fields[0]}", int(fields[1]), gloss.strip()))
    return synsets


def _hash(key: str) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def _split_of(key: str) -> str:
    bucket = _hash(key) % 10
    return "test" if bucket == 0 else "val" if bucket == 1 else "train"


def _encode(words: list[str], index: dict[str, int]) -> list[int]:
    ids = [index.get(w, UNKNOWN) for w in words[:TOKENS]]
    return [PAD] * (TOKENS - len(ids)) + ids


@dataclass(frozen=True)
class WordNetGlosses:
    """The factory of the ``wordnet`` dataset: (train, val, test) of (token ids (32,), label).

    Args:
        directory: WordNet's dictionary folder (``data.noun`` ...); default Debian's.

    Raises:
        UserError: the data files are missing (with how to get them).
    """

    directory: str | None = None

    def __call__(self):
        from tdsearch.data._user import Data

        directory = Path(self.directory) if self.directory else WORDNET_DEBIAN_DIR
        missing = [p for p in PARTS_OF_SPEECH if not (directory / f"data.{p}").is_file()]
        if missing:
            raise UserError(
                f"wordnet not found in {directory} (no data.{missing[0]}): install Debian's "
                "package with `apt-get install wordnet-base`, or pass --data-dir DIR holding "
                "WordNet 3.0's data.noun, data.verb, data.adj and data.adv"
            )
        synsets = read_glosses(directory)
        words = {key: _WORD.findall(gloss.lower()) for key, _, gloss in synsets}
        counts = Counter(
            w for key, _, _ in synsets if _split_of(key) == "train" for w in words[key]
        )
        index = {w: k + 2 for k, (w, _) in enumerate(counts.most_common(VOCABULARY))}
        splits: dict[str, tuple[list, list]] = {s: ([], []) for s in ("train", "val", "test")}
        # in hash order, not file order (which runs adjectives first, nouns by offset): so the
        # first N training glosses (--max-train-samples N) are a sample of every class
        for key, label, _ in sorted(synsets, key=lambda s: (_hash(s[0]) // 10, s[0])):
            tokens, labels = splits[_split_of(key)]
            tokens.append(_encode(words[key], index))
            labels.append(label)
        sets = {
            name: TensorDataset(torch.tensor(t, dtype=torch.int64), torch.tensor(y))
            for name, (t, y) in splits.items()
        }
        return Data(
            sets["train"],
            sets["val"],
            sets["test"],
            num_classes=len(LEXNAMES),
            name="wordnet",
            # bumped when the encoding or the order changes, so cached baselines are not reused
            fingerprint_text=f"wordnet|v2|{directory.resolve()}",
        )
