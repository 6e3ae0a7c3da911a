"""Sentences for the all-MiniLM-L6-v2 task: the docstrings of Python's own standard library,
split into sentences and tokenized for BERT by the tokenizer the model's package ships.
"""

from __future__ import annotations

import numpy as np

from model_files import SENTENCE_TOKENS, minilm_folder

STDLIB_MODULES = (
    "argparse", "asyncio", "collections", "csv", "decimal", "email", "fractions", "inspect",
    "json", "logging", "pathlib", "re", "shutil", "sqlite3", "statistics", "subprocess",
    "threading", "unittest",
)  # fmt: skip


def sentences(count: int, last: bool = False) -> np.ndarray:
    """`count` English sentences from the standard library's docstrings, as BERT token ids
    (count, 64), zero-padded: the first `count` of a fixed shuffle, or the `last` ones (the
    evaluation set, disjoint from any calibration set while the two fit in the pool)."""
    if not count:  # (the benchmark's child processes ask for none: keep transformers out)
        return np.zeros((0, SENTENCE_TOKENS), np.int64)
    import inspect
    import pydoc
    import re

    from transformers import AutoTokenizer

    found: dict[str, None] = {}
    for module in STDLIB_MODULES:
        for _, member in inspect.getmembers(pydoc.locate(module)):
            text = " ".join((inspect.getdoc(member) or "").split())
            found.update((s, None) for s in re.split(r"(?<=[.!?]) ", text) if 30 < len(s) < 300)
    pool = [list(found)[i] for i in np.random.default_rng(0).permutation(len(found))]
    if count > len(pool):
        raise ValueError(f"only {len(pool)} sentences; ask for at most that many")
    picked = pool[len(pool) - count :] if last else pool[:count]
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_folder()))
    ids = tokenizer(picked, padding="max_length", truncation=True, max_length=SENTENCE_TOKENS)
    return np.asarray(ids["input_ids"], np.int64).reshape(count, SENTENCE_TOKENS)
