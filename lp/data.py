"""Text corpora (hub or local mirror), tokenization, calibration windows and PPL windows.

Two sources stand behind one interface and give the *same string* for a corpus/split:
  * `hub`: Hugging Face `datasets`, exactly as the paper's code loads them;
  * `local`: a mirror folder in the layout of `shared/data` (see its README), with the
    hub's row semantics reproduced from the raw files.
`data.source=auto` uses the local file when it exists, else the hub. What was really used is
returned as provenance and recorded in `result.json`; nothing is substituted silently.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _lines_as_rows(text: str) -> list[str]:
    """WikiText raw files -> HF `text` rows: blank lines (" \\n") become ""."""
    return [line if line.strip() else "" for line in text.splitlines(keepends=True)]


def _stripped_rows(text: str) -> list[str]:
    """PTB files -> HF `sentence` rows (`line.strip()`)."""
    return [line.strip() for line in text.splitlines()]


def _jsonl_rows(text: str, field: str = "text") -> list[str]:
    return [json.loads(line)[field] for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Corpus:
    """One text corpus: where it lives on the hub and in a local mirror, and how rows join."""

    hub: tuple  # args of datasets.load_dataset
    field: str
    local: str  # path template under the mirror root, `{split}` filled in
    parse: callable
    splits: tuple = ("train", "validation", "test")
    hub_files: dict | None = None  # data_files per split (C4 shards)
    join: str = "\n\n"
    documents: bool = False  # sample windows of random documents (too large to join and tokenize whole)


CORPORA = {
    "wikitext2": Corpus(("wikitext", "wikitext-2-raw-v1"), "text", "wikitext2/{split}.txt", _lines_as_rows),
    "wikitext2_tok": Corpus(("wikitext", "wikitext-2-v1"), "text", "wikitext2_tokenized/{split}.txt",
                            _lines_as_rows),
    "ptb": Corpus(("ptb_text_only", "penn_treebank"), "sentence", "ptb/{split}.txt", _stripped_rows),
    "c4": Corpus(("allenai/c4",), "text", "c4/{split}.jsonl", _jsonl_rows, splits=("train", "validation"),
                 hub_files={"train": "en/c4-train.00000-of-01024.json.gz",
                            "validation": "en/c4-validation.00000-of-00008.json.gz"}, documents=True),
    # The Pile's validation set as AWQ loads it: load_dataset("mit-han-lab/pile-val-backup",
    # split="validation"), one row per document, field `text`. Mirror: pile/validation.jsonl (the hub
    # file val.jsonl.zst decompressed: one {"text": ..., "meta": ...} object per line, hub order).
    "pile": Corpus(("mit-han-lab/pile-val-backup",), "text", "pile/{split}.jsonl", _jsonl_rows,
                   splits=("validation",), documents=True),
}
SOURCES = ("auto", "local", "hub")


def corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}")
    return CORPORA[name]


def resolve(name: str, split: str, root: str | None, source: str = "auto") -> dict:
    """Decide where `name/split` comes from, without reading it. Returns provenance
    `{"corpus", "split", "source": "local"|"hub", "path"|"hub_id"}`; raises early on bad input."""
    c = corpus(name)
    if split not in c.splits:
        raise ValueError(f"corpus {name!r} has no split {split!r}; choose one of {list(c.splits)}")
    if source not in SOURCES:
        raise ValueError(f"data.source={source!r}; choose one of {list(SOURCES)}")
    path = Path(root).expanduser() / c.local.format(split=split) if root else None
    if source == "local" or (source == "auto" and path is not None and path.is_file()):
        if path is None or not path.is_file():
            have = sorted(p.stem for p in path.parent.glob("*")) if path is not None and path.parent.is_dir() else []
            raise FileNotFoundError(
                f"no local file for corpus {name!r} split {split!r}: expected {path} "
                f"(data.root={root!r}); local splits present: {have or 'none'}"
            )
        return {"corpus": name, "split": split, "source": "local", "path": str(path)}
    return {"corpus": name, "split": split, "source": "hub", "hub_id": "/".join(c.hub)}


@functools.lru_cache(maxsize=8)
def load_rows(name: str, split: str, root: str | None, source: str = "auto") -> tuple[list[str], dict]:
    """Rows of `name/split` with HF row semantics, and their provenance."""
    prov = resolve(name, split, root, source)
    c = CORPORA[name]
    if prov["source"] == "local":
        rows = c.parse(Path(prov["path"]).read_text(encoding="utf-8"))
    else:
        rows = _hub_rows(c, name, split, root)
    prov["rows"] = len(rows)
    return rows, prov


def _hub_rows(c: Corpus, name: str, split: str, root: str | None) -> list[str]:
    import datasets

    kwargs = {"data_files": {split: c.hub_files[split]}} if c.hub_files else {}
    try:
        ds = datasets.load_dataset(*c.hub, split=split, **kwargs)
    except Exception as e:  # offline, gated, renamed...
        local = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*.*")) if root and Path(root).is_dir() else []
        raise FileNotFoundError(
            f"corpus {name!r} split {split!r} is not in the local mirror (data.root={root!r}, expected "
            f"<data.root>/{c.local.format(split=split)}) and the hub "
            f"failed ({type(e).__name__}: {str(e)[:200]}). Local files present: {local or 'none'}"
        ) from e
    return list(ds[c.field])


_TOKENIZED: dict[tuple, tuple[torch.Tensor, dict, object]] = {}  # (fingerprint, corpus, split, root, source)


def fingerprint(tokenizer) -> str | None:
    """What a fast tokenizer does to text, as a digest of its class and its whole serialized pipeline
    (normalizer, pre-tokenizer, model, post-processor, added tokens): two loads of the same tokenizer
    (every run loads its own) agree. None for a tokenizer without a serialized pipeline (a slow one):
    what it does cannot be read off, so it is never taken for another."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    return hashlib.sha256(f"{type(tokenizer).__qualname__}|{backend.to_str()}".encode()).hexdigest()


def tokenized(tokenizer, name: str, split: str, root: str | None = None, source: str = "auto"):
    """Whole split joined with the corpus separator (`"\\n\\n"`), tokenized once per process for the same
    tokenizer (by `fingerprint`, so the runs of one process share it; a tokenizer without one is cached
    for that object only, held by the cache so its id is not reused): `([1, N] ids, provenance)`."""
    fp = fingerprint(tokenizer)
    key = (fp or f"object {id(tokenizer)}", name, split, root, source)
    if key not in _TOKENIZED:
        rows, prov = load_rows(name, split, root, source)
        ids = tokenizer(CORPORA[name].join.join(rows), return_tensors="pt").input_ids
        if len(_TOKENIZED) >= 8:  # a few corpora per process; never grows without bound
            _TOKENIZED.pop(next(iter(_TOKENIZED)))
        _TOKENIZED[key] = ids, {**prov, "tokens": ids.shape[1]}, tokenizer if fp is None else None
    ids, prov, _ = _TOKENIZED[key]
    return ids, dict(prov)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int,
                        holdout: float = 0.1, nval: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows as the reference code samples them.

    `random.seed(seed)`; each calibration window starts at
    `random.randint(0, int((1 - holdout) * N) - seqlen - 1)`, so the last `holdout` of the
    token stream is never used for calibration; `nval` validation windows are then drawn with
    the same generator from that held-out tail. Returns `([nsamples, seqlen], [nval, seqlen])`.
    """
    n = ids.shape[-1]
    ids = ids.reshape(-1)
    hi = int((1 - holdout) * n) - seqlen - 1
    if hi < 0 or (nval and n - seqlen - 1 < int((1 - holdout) * n)):
        raise ValueError(f"corpus has {n} tokens: too short for windows of seqlen={seqlen} with holdout={holdout}")
    rng = random.Random(seed)  # same stream as random.seed(seed); random.randint(...)
    starts = [rng.randint(0, hi) for _ in range(nsamples)]
    vstarts = [rng.randint(int((1 - holdout) * n), n - seqlen - 1) for _ in range(nval)]
    take = lambda ss: torch.stack([ids[s:s + seqlen] for s in ss]) if ss else ids.new_zeros(0, seqlen)  # noqa: E731
    return take(starts), take(vstarts)


def ppl_sets(datasets, default_split: str) -> list[tuple[str, str]]:
    """`eval.ppl.datasets` entries -> `[(corpus, split)]`: `"ptb"` is evaluated on `default_split`
    (`eval.ppl.split`), `"ptb:validation"` on its own split. Each corpus may appear once: its metric
    is `ppl/<corpus>` and the split is recorded with its provenance."""
    out, seen = [], set()
    for entry in datasets:
        name, _, split = str(entry).partition(":")
        corpus(name)  # unknown name -> the error listing the corpora
        if name in seen:
            raise ValueError(f"eval.ppl.datasets lists corpus {name!r} twice ({list(datasets)}); "
                             "each corpus is evaluated on one split per run (metric ppl/<corpus>)")
        seen.add(name)
        out.append((name, split or default_split))
    return out


DOCUMENT_PROTOCOL = "documents: random document >= seqlen+1 tokens, random window"


def document_windows(tokenizer, rows: list[str], nsamples: int, seqlen: int, seed: int,
                     holdout: float = 0.1, nval: int = 0, max_draws: int = 100_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a document corpus, as the reference code samples C4/RedPajama training windows:
    `random.seed(seed)`; per window, random documents among the first `1 - holdout` of the rows
    until one has >= seqlen + 1 tokens, then a random window of it. `nval` validation windows are
    then drawn the same way, with the same generator, from the held-out last `holdout` of the rows
    (so the training windows do not depend on `nval`, and no document gives both). Only the drawn
    documents are tokenized. Returns `([nsamples, seqlen], [nval, seqlen])`."""
    rng = random.Random(seed)
    cut = int(len(rows) * (1 - holdout))
    if cut < 1:
        raise ValueError(f"corpus has {len(rows)} documents: none left for calibration with holdout={holdout}")
    if nval and cut >= len(rows):
        raise ValueError(f"corpus has {len(rows)} documents: none held out for {nval} validation windows "
                         f"with holdout={holdout}")
    draw = lambda lo, hi: _document_window(tokenizer, rows, rng, lo, hi, seqlen, max_draws)  # noqa: E731
    take = lambda ws: torch.stack(ws) if ws else torch.zeros(0, seqlen, dtype=torch.long)  # noqa: E731
    return (take([draw(0, cut - 1) for _ in range(nsamples)]),
            take([draw(cut, len(rows) - 1) for _ in range(nval)]))


def _document_window(tokenizer, rows: list[str], rng: random.Random, lo: int, hi: int, seqlen: int,
                     max_draws: int) -> torch.Tensor:
    """One window `[seqlen]`: documents `rows[rng.randint(lo, hi)]` until one has >= seqlen + 1 tokens,
    then `rng.randint(0, len - seqlen - 1)` as its start (GPTQ's get_c4 draws)."""
    for _tries in range(max_draws):
        doc = tokenizer(rows[rng.randint(lo, hi)], return_tensors="pt").input_ids[0]
        if doc.numel() >= seqlen + 1:
            break
    else:
        raise ValueError(f"no document of {seqlen + 1}+ tokens found in {max_draws} draws among rows "
                         f"{lo}..{hi} (seqlen={seqlen})")
    s = rng.randint(0, doc.numel() - seqlen - 1)
    return doc[s:s + seqlen]


def sample_windows(tokenizer, name: str, split: str, nsamples: int, seqlen: int, seed: int, holdout: float,
                   root: str | None, source: str = "auto", nval: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The one sampler of training windows `[nsamples, seqlen]` and held-out windows `[nval, seqlen]`
    from a corpus split, with provenance; calibration, held-out verification and distillation all
    draw here. Document corpora (`Corpus.documents`: pile, c4) use `document_windows`, which
    tokenizes only the drawn documents; the others use `calibration_windows` on the joined stream,
    tokenized once. Either way the training windows come first from the same seeded generator, so
    they do not depend on `nval`. Memoised per arguments (calibration and the held-out check of one
    run ask for the same draw: the documents are tokenized once); callers get their own copies."""
    train, val, prov = _sample_windows(tokenizer, name, split, int(nsamples), int(seqlen), int(seed), float(holdout),
                                       root, source, int(nval))
    return train.clone(), val.clone(), dict(prov)


@functools.lru_cache(maxsize=4)
def _sample_windows(tokenizer, name, split, nsamples, seqlen, seed, holdout, root, source, nval):
    if corpus(name).documents:
        rows, prov = load_rows(name, split, root, source)
        train, val = document_windows(tokenizer, rows, nsamples, seqlen, seed, holdout, nval=nval)
        return train, val, {**prov, "protocol": DOCUMENT_PROTOCOL}
    ids, prov = tokenized(tokenizer, name, split, root, source)
    train, val = calibration_windows(ids, nsamples, seqlen, seed, holdout=holdout, nval=nval)
    return train, val, prov


def calibration_set(tokenizer, name: str, split: str, nsamples: int, seqlen: int, seed: int, holdout: float,
                    root: str | None, source: str = "auto", nval: int = 0) -> tuple[torch.Tensor, dict]:
    """Calibration windows `[nsamples, seqlen]` and provenance: the training windows of `sample_windows`
    (pass the run's `nval` so the held-out check reuses the same draw)."""
    train, _, prov = sample_windows(tokenizer, name, split, nsamples, seqlen, seed, holdout, root, source, nval)
    return train, prov


def ppl_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """GPTQ protocol: non-overlapping `seqlen` windows of the token stream, remainder dropped."""
    n = ids.shape[-1] // seqlen
    if n == 0:
        raise ValueError(f"split has {ids.shape[-1]} tokens, fewer than seqlen={seqlen}")
    win = ids.reshape(-1)[: n * seqlen].view(n, seqlen)
    return win[:max_windows] if max_windows else win


def c4_windows(tokenizer, rows: list[str], seqlen: int, nsamples: int = 256, seed: int = 0) -> torch.Tensor:
    """The paper code's C4 protocol: `random.seed(seed)`; `nsamples` random documents longer
    than `seqlen` tokens, one random `seqlen` window each (`document_windows` over every row).
    Returns `[nsamples, seqlen]`."""
    return document_windows(tokenizer, rows, nsamples, seqlen, seed, holdout=0.0)[0]


def eval_windows(tokenizer, name: str, split: str, seqlen: int, root: str | None, source: str = "auto",
                 max_windows: int | None = None) -> tuple[torch.Tensor, dict]:
    """PPL windows `[W, seqlen]` of a corpus split (C4 by its own protocol) and their provenance."""
    if name == "c4":
        rows, prov = load_rows(name, split, root, source)
        win = c4_windows(tokenizer, rows, seqlen, nsamples=max_windows or 256)
        return win, {**prov, "protocol": "c4: seed 0, one random window per random long document"}
    ids, prov = tokenized(tokenizer, name, split, root, source)
    win = ppl_windows(ids, seqlen, max_windows)
    return win, {**prov, "protocol": "gptq: joined with \\n\\n, non-overlapping windows"}
