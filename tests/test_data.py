"""Corpora with hub row semantics from the local mirror, the calibration sampler, PPL windows."""

import json
import random

import pytest
import torch
from conftest import DATA

from lp import data


def test_local_rows_follow_hub_semantics():
    rows, prov = data.load_rows("wikitext2", "test", str(DATA))
    assert prov["source"] == "local" and len(rows) == 4358  # HF wikitext-2-raw-v1 test rows
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    ptb, _ = data.load_rows("ptb", "test", str(DATA))
    assert len(ptb) == 3761 and ptb[0] == ptb[0].strip() != ""
    tok, _ = data.load_rows("wikitext2_tok", "train", str(DATA))
    assert len(tok) == 36718


def test_missing_split_names_what_exists():
    with pytest.raises(FileNotFoundError, match=r"wikitext2.*'train'.*expected .*wikitext2/train.txt.*test"):
        data.resolve("wikitext2", "train", str(DATA), source="local")
    with pytest.raises(ValueError, match="unknown corpus 'c5'"):
        data.resolve("c5", "test", str(DATA))
    with pytest.raises(ValueError, match="no split 'dev'"):
        data.resolve("ptb", "dev", str(DATA))
    with pytest.raises(ValueError, match="data.source='disk'"):
        data.resolve("ptb", "test", str(DATA), source="disk")


def test_auto_source_falls_back_to_hub_and_says_so():
    prov = data.resolve("wikitext2", "train", str(DATA), source="auto")
    assert prov == {"corpus": "wikitext2", "split": "train", "source": "hub", "hub_id": "wikitext/wikitext-2-raw-v1"}


def test_calibration_windows_reproduce_reference_sampling():
    ids = torch.arange(10_000)[None]
    calib, val = data.calibration_windows(ids, nsamples=5, seqlen=128, seed=2, nval=2)
    # Reference: random.seed(seed); start = random.randint(0, int(0.9 * ntokens) - seqlen - 1)
    random.seed(2)
    expected = [random.randint(0, int(0.9 * 10_000) - 128 - 1) for _ in range(5)]
    assert calib[:, 0].tolist() == expected == [926, 1500, 1390, 5915, 2770]
    assert torch.equal(calib, torch.stack([torch.arange(s, s + 128) for s in expected]))
    assert val.shape == (2, 128) and (val[:, 0] >= 9000).all()  # held-out tail only
    again, _ = data.calibration_windows(ids, nsamples=5, seqlen=128, seed=2)
    assert torch.equal(again, calib)
    with pytest.raises(ValueError, match="too short"):
        data.calibration_windows(ids, nsamples=1, seqlen=9_500, seed=0)


def test_ppl_windows_drop_the_remainder():
    win = data.ppl_windows(torch.arange(10)[None], seqlen=3)
    assert win.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.ppl_windows(torch.arange(10)[None], 3, max_windows=2).shape == (2, 3)
    with pytest.raises(ValueError, match="fewer than seqlen=20"):
        data.ppl_windows(torch.arange(10)[None], 20)


def test_c4_protocol_picks_long_documents_with_seeded_windows():
    from lp.models import byte_tokenizer

    tok = byte_tokenizer()
    docs = ["abcdefghij" * 5, "KLMNOPQRST" * 6, "0123456789" * 4]  # long documents, disjoint alphabets
    rows = ["short", docs[0], "tiny", docs[1], docs[2]]
    a = data.c4_windows(tok, rows, seqlen=20, nsamples=8, seed=0)
    assert a.shape == (8, 20) and torch.equal(a, data.c4_windows(tok, rows, seqlen=20, nsamples=8, seed=0))
    assert not torch.equal(a, data.c4_windows(tok, rows, seqlen=20, nsamples=8, seed=1))
    encoded = [tok(d, return_tensors="pt").input_ids[0].tolist() for d in docs]
    source = []
    for w in a.tolist():  # each window is a contiguous slice of exactly one long document
        hits = [i for i, e in enumerate(encoded) if any(e[s:s + 20] == w for s in range(len(e) - 19))]
        assert len(hits) == 1, w
        source.append(hits[0])
    assert len(set(source)) >= 2  # one random document per window, not one document for all


def test_ppl_sets_give_each_corpus_its_own_split():
    assert data.ppl_sets(["wikitext2", "ptb:validation"], "test") == [("wikitext2", "test"), ("ptb", "validation")]
    with pytest.raises(ValueError, match="lists corpus 'ptb' twice"):
        data.ppl_sets(["ptb", "ptb:validation"], "test")
    with pytest.raises(ValueError, match="unknown corpus 'wiki'"):
        data.ppl_sets(["wiki:test"], "test")


def test_official_ptb_validation_windows():
    """datautils_block.get_ptb(test_only): "\\n\\n".join of HF `sentence` rows (= line.strip()) of the
    *validation* split, tokenized once; test_ppl then cuts non-overlapping seqlen windows."""
    from lp.models import byte_tokenizer

    tok = byte_tokenizer()
    lines = (DATA / "ptb" / "validation.txt").read_text(encoding="utf-8").splitlines()
    ids = tok("\n\n".join(line.strip() for line in lines), return_tensors="pt").input_ids
    win, prov = data.eval_windows(tok, "ptb", "validation", 2048, str(DATA))
    n = ids.numel() // 2048
    assert prov["split"] == "validation" and win.shape == (n, 2048)
    assert torch.equal(win, torch.stack([ids[0, i * 2048:(i + 1) * 2048] for i in range(n)]))


def test_pile_local_mirror_rows_and_document_windows(tmp_path):
    from lp.models import byte_tokenizer

    docs = [{"text": f"doc {i} " + "abcdefgh" * (i % 5) * 4, "meta": {"pile_set_name": "Pile-CC"}} for i in range(40)]
    (tmp_path / "pile").mkdir()
    (tmp_path / "pile" / "validation.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    data.load_rows.cache_clear()
    rows, prov = data.load_rows("pile", "validation", str(tmp_path))
    assert rows == [d["text"] for d in docs] and prov["source"] == "local" and prov["rows"] == 40
    tok = byte_tokenizer()
    win, prov = data.calibration_set(tok, "pile", "validation", 6, 50, seed=2, holdout=0.1, root=str(tmp_path))
    again, _ = data.calibration_set(tok, "pile", "validation", 6, 50, seed=2, holdout=0.1, root=str(tmp_path))
    assert win.shape == (6, 50) and torch.equal(win, again) and prov["protocol"].startswith("documents")
    # reference: random.seed(2); doc index in [0, int(0.9 * 40) - 1] until >= 51 tokens; random window
    random.seed(2)
    while True:
        i = random.randint(0, int(40 * 0.9) - 1)
        ids = tok(rows[i], return_tensors="pt").input_ids[0]
        if ids.numel() >= 51:
            break
    s = random.randint(0, ids.numel() - 50 - 1)
    assert torch.equal(win[0], ids[s:s + 50])
    with pytest.raises(ValueError, match="no document of 10001\\+ tokens found in 50 draws"):
        data.document_windows(tok, rows[:2], 1, 10_000, seed=0, holdout=0.0, max_draws=50)
    with pytest.raises(ValueError, match="corpus 'pile' has no split 'train'"):
        data.resolve("pile", "train", str(tmp_path))


def test_pile_unreachable_hub_is_a_clear_error(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError(f"Couldn't reach {args[0]!r} on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    data.load_rows.cache_clear()
    with pytest.raises(FileNotFoundError, match=r"corpus 'pile' split 'validation' is not in the local mirror .*"
                                                r"expected <data.root>/pile/validation.jsonl\) and the hub failed "
                                                r"\(ConnectionError: Couldn't reach 'mit-han-lab/pile-val-backup'"):
        data.load_rows("pile", "validation", str(tmp_path))
    assert data.resolve("pile", "validation", str(tmp_path)) == {
        "corpus": "pile", "split": "validation", "source": "hub", "hub_id": "mit-han-lab/pile-val-backup"}


def _document_mirror(root, corpus: str, split: str, n: int = 40) -> list[str]:
    """`<root>/<corpus>/<split>.jsonl` with `n` distinct documents of 40..79 random letters."""
    rng = random.Random(0)
    texts = [f"doc {i:03d}: " + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(40 + i))
             for i in range(n)]
    (root / corpus).mkdir()
    (root / corpus / f"{split}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return texts


class CountingTokenizer:
    """The byte tokenizer, counting calls (one per tokenized document)."""

    def __init__(self):
        from lp.models import byte_tokenizer

        self.tok, self.calls = byte_tokenizer(), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


def _sources(windows, docs) -> list[list[int]]:
    """Per window `[T]`, the indices of the documents `docs` (token id lists) that contain it."""
    def within(w, d):
        return any(d[s:s + len(w)] == w for s in range(len(d) - len(w) + 1))
    return [[i for i, d in enumerate(docs) if within(w.tolist(), d)] for w in windows]


@pytest.mark.parametrize("name,split", [("pile", "validation"), ("c4", "validation")])
def test_distill_and_heldout_windows_use_the_document_sampler(cfg_factory, tmp_path, monkeypatch, name, split):
    """Distillation (and the held-out verification windows) on a document corpus draw from the
    calibration sampler: only drawn documents are tokenized (never the joined corpus), the windows
    equal `document_windows` for the same seed, training windows come from the first rows and
    validation windows from the held-out last rows, never from the same document."""
    from lp import distill, run, verify

    texts = _document_mirror(tmp_path, name, split)
    cfg = cfg_factory("model=tiny_llama", f"calib.corpus={name}", f"calib.split={split}", "calib.holdout=0.25",
                      "calib.nsamples=5", "calib.seqlen=16", "calib.nval=3", "distill=quick", "distill.nsamples=6",
                      "distill.nval=2", "distill.seqlen=16", "distill.seed=7")
    cfg.data.root = str(tmp_path)
    monkeypatch.setattr(data, "tokenized", lambda *a, **k: pytest.fail("the whole corpus was tokenized"))
    tok = CountingTokenizer()
    train, val, prov = distill.distill_windows(cfg, tok)
    assert tok.calls == 6 + 2 and prov["protocol"] == data.DOCUMENT_PROTOCOL  # every document is long enough
    ref_train, ref_val = data.document_windows(tok.tok, texts, 6, 16, seed=7, holdout=0.25, nval=2)
    assert torch.equal(train, ref_train) and torch.equal(val, ref_val)
    docs = [tok.tok(t).input_ids for t in texts]
    train_docs, val_docs = _sources(train, docs), _sources(val, docs)
    assert all(len(s) == 1 and s[0] < 30 for s in train_docs)  # first 75% of the 40 rows
    assert all(len(s) == 1 and s[0] >= 30 for s in val_docs)  # held-out last 25%
    held = verify.heldout_windows(cfg, tok.tok)
    assert held.shape == (3, 16) and all(len(s) == 1 and s[0] >= 30 for s in _sources(held, docs))
    assert torch.equal(held, data.document_windows(tok.tok, texts, 5, 16, seed=cfg.calib.seed, holdout=0.25,
                                                   nval=3)[1])
    calib, _ = data.calibration_set(tok.tok, name, split, 5, 16, cfg.calib.seed, 0.25, str(tmp_path))
    assert torch.equal(calib, data.document_windows(tok.tok, texts, 5, 16, cfg.calib.seed, 0.25, nval=3)[0])
    once = CountingTokenizer()  # calibration and the held-out check of one run: one draw, documents tokenized once
    windows, _ = run.calibration(cfg, once)
    assert torch.equal(windows, calib) and torch.equal(verify.heldout_windows(cfg, once), held)
    assert once.calls == 5 + 3
    assert run.stats_key(cfg)["calib"]["sampler"] == data.DOCUMENT_PROTOCOL  # c4 entries of the old sampler: no match
    with pytest.raises(ValueError, match="corpus has 40 documents: none held out for 2 validation windows"):
        data.document_windows(tok.tok, texts, 1, 16, seed=0, holdout=0.0, nval=2)


def test_a_split_is_tokenized_once_per_tokenizer_not_per_load(monkeypatch):
    """Every run loads its own tokenizer; the runs of one process share one tokenization of a split
    (by what the tokenizer does, `data.fingerprint`), and a tokenizer that splits text otherwise gets its own."""
    from tokenizers import pre_tokenizers

    from lp.models import byte_tokenizer

    a, b, other = byte_tokenizer(), byte_tokenizer(), byte_tokenizer()
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    calls, real = [], data.load_rows
    monkeypatch.setattr(data, "load_rows", lambda *x, **k: calls.append(x) or real(*x, **k))
    monkeypatch.setattr(data, "_TOKENIZED", {})
    ids_a, prov = data.tokenized(a, "ptb", "test", str(DATA))
    ids_b, _ = data.tokenized(b, "ptb", "test", str(DATA))
    assert len(calls) == 1 and torch.equal(ids_a, ids_b) and prov["tokens"] == ids_a.shape[1]
    assert data.fingerprint(a) == data.fingerprint(b) != data.fingerprint(other)
    ids_o, _ = data.tokenized(other, "ptb", "test", str(DATA))
    assert len(calls) == 2 and not torch.equal(ids_o[:, :100], ids_a[:, :100])


def test_a_tokenizer_without_a_serialized_pipeline_is_never_taken_for_another(monkeypatch):
    """A slow tokenizer (no `backend_tokenizer`) has no fingerprint: its tokenization is reused for that
    object only, never for another object, even one of the same kind."""
    from lp.models import byte_tokenizer

    class Slow:  # what a slow tokenizer offers lp: __call__, no serialized pipeline
        def __init__(self):
            self.inner = byte_tokenizer()

        def __call__(self, text, **kw):
            return self.inner(text, **kw)

    a, b = Slow(), Slow()
    calls, real = [], data.load_rows
    monkeypatch.setattr(data, "load_rows", lambda *x, **k: calls.append(x) or real(*x, **k))
    monkeypatch.setattr(data, "_TOKENIZED", {})
    assert data.fingerprint(a) is None
    ids_a, _ = data.tokenized(a, "ptb", "test", str(DATA))
    assert torch.equal(data.tokenized(a, "ptb", "test", str(DATA))[0], ids_a) and len(calls) == 1
    data.tokenized(b, "ptb", "test", str(DATA))
    assert len(calls) == 2
