"""Offline WordNet lexicon: the candidate pool of NegLabel / SynOOD negative labels.

NegLabel (Jiang et al., ICLR 2024, Sec. 3.1) draws its negative labels from the nouns and
adjectives of WordNet. We read them offline from the Princeton WordNet 3.0 database files that
Debian's ``wordnet-base`` package installs (``/usr/share/wordnet/data.noun`` and ``data.adj``),
or from any folder holding files in that format.

Format of a ``data.<pos>`` line (``wndb(5WN)``)::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] p_cnt [ptr...] | gloss

``w_cnt`` is a two-digit *hexadecimal* count; words use ``_`` for spaces, and adjectives may carry
a syntactic marker ``(a)``, ``(p)`` or ``(ip)``. Lines starting with two spaces are the licence
header.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

DEFAULT_WORDNET_DIRS = ("/usr/share/wordnet", "/usr/local/share/wordnet", "/usr/share/wordnet/dict")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")
POS_FILES = {"noun": "data.noun", "adj": "data.adj"}


class WordNetNotFoundError(FileNotFoundError):
    """The WordNet database files are missing."""


def find_wordnet_dir(wordnet_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding ``data.noun`` and ``data.adj``: ``wordnet_dir``, ``$OODFORGE_WORDNET`` or Debian's."""
    candidates = [wordnet_dir] if wordnet_dir is not None else (
        [os.environ["OODFORGE_WORDNET"]] if os.environ.get("OODFORGE_WORDNET") else list(DEFAULT_WORDNET_DIRS))
    for c in candidates:
        d = Path(c)
        if all((d / f).is_file() for f in POS_FILES.values()):
            return d
    where = str(wordnet_dir) if wordnet_dir is not None else ", ".join(str(c) for c in candidates)
    raise WordNetNotFoundError(
        f"WordNet database files (data.noun, data.adj) not found in {where}. Install Debian's wordnet-base "
        "package (apt-get install wordnet-base) or pass a folder holding them (--wordnet-dir DIR / wordnet_dir=DIR)."
    )


def parse_data_file(path: str | os.PathLike, first_lemma_only: bool = False) -> list[str]:
    """The lemmas of one ``data.<pos>`` file, in file order, ``_`` replaced by spaces, deduplicated.

    Deduplication is case-insensitive and keeps the first spelling (WordNet lists e.g. both
    ``Mercury`` and ``mercury``; NegLabel deduplicates its word list the same way).
    ``first_lemma_only`` keeps one lemma per synset (the head word) instead of all synonyms.
    """
    path = Path(path)
    out: list[str] = []
    seen: set[str] = set()
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if line.startswith("  ") or not line.strip():
                continue  # licence header
            parts = line.split(" ")
            try:
                n_words = int(parts[3], 16)
                words = [parts[4 + 2 * i] for i in range(n_words)]
            except (IndexError, ValueError):
                raise ValueError(f"{path}:{lineno}: not a WordNet data line (expected 'offset lex_filenum "
                                 "ss_type w_cnt word lex_id ...'); is this a WordNet 3.x data.noun/data.adj file?"
                                 ) from None
            if first_lemma_only:
                words = words[:1]
            for w in words:
                w = _ADJ_MARKER.sub("", w).replace("_", " ").strip()
                key = w.lower()
                if w and key not in seen:
                    seen.add(key)
                    out.append(w)
    return out


def load_wordnet(wordnet_dir: str | os.PathLike | None = None, first_lemma_only: bool = False) -> dict[str, list[str]]:
    """``{"noun": [...], "adj": [...]}``: WordNet's noun and adjective lemmas (see :func:`parse_data_file`)."""
    d = find_wordnet_dir(wordnet_dir)
    return {pos: parse_data_file(d / fname, first_lemma_only) for pos, fname in POS_FILES.items()}


__all__ = ["WordNetNotFoundError", "find_wordnet_dir", "parse_data_file", "load_wordnet", "DEFAULT_WORDNET_DIRS"]
