"""LinearPatch: the matrix, its placement at every cut, generation, save/reload and run(cfg)."""

import copy
import json
import math

import pytest
import torch
from conftest import DATA, SMALL
from test_calib import make_ctx, naive_scales, naive_states

from lp import data, load_pruned
from lp.evaluate.ppl import perplexity
from lp.hadamard import hadamard
from lp.models import Decoder, drop_layers, tiny_model
from lp.patch import (
    LinearPatch,
    Patched,
    build_patches,
    find_patches,
    insert_patches,
    patch_matrix,
    runs_of,
    strip_patches,
)
from lp.run import preflight, run

D = 64
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))


def random_patches(removed, L, seed=0):
    """Non-symmetric near-identity patches, so a misplaced or transposed patch cannot pass."""
    g = torch.Generator().manual_seed(seed)
    return {a: LinearPatch(torch.eye(D) + 0.3 * torch.randn(D, D, generator=g) / D ** 0.5, a, b, L)
            for a, b in runs_of(removed)}


def manual_forward(dense, removed, patches, ids):
    """Dense model with hooks: a removed layer returns its input unchanged, and the last removed layer
    of each run [a, b) returns (its input = h_a of the pruned stream) @ P. Independent of `Patched`."""
    dec = Decoder(dense)
    ends = {p.end - 1: p for p in patches.values()}

    def hook(i):
        def fn(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            x = ends[i](x) if i in ends else x
            return (x, *out[1:]) if isinstance(out, tuple) else x
        return fn

    handles = [dec.layers[i].register_forward_hook(hook(i), with_kwargs=True) for i in removed]
    try:
        with torch.no_grad():
            return dense(input_ids=ids, use_cache=False).logits
    finally:
        for h in handles:
            h.remove()


def pruned_patched(arch, removed, L=8, seed=0):
    dense = tiny_model(arch, num_layers=L, hidden_size=D, seed=seed)
    model = copy.deepcopy(dense)
    patches = random_patches(removed, L, seed)
    drop_layers(model, removed)
    insert_patches(model, patches)
    return dense, model, patches


# --------------------------------------------------------------------------- the matrix
def test_rotate_patch_is_symmetric_with_eigenvalues_s():
    s = torch.rand(D, generator=torch.Generator().manual_seed(0)) * 3 + 0.1
    P = patch_matrix(s, "rotate", hadamard(D, dtype=torch.float64))
    assert torch.equal(P, P.T) and P.dtype == torch.float32
    torch.testing.assert_close(torch.linalg.eigvalsh(P.double()), s.double().sort().values, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(P, torch.diag(torch.diagonal(P)))  # a real rotation, not diagonal
    torch.testing.assert_close(patch_matrix(torch.ones(D), "rotate", hadamard(D)), torch.eye(D), atol=1e-6, rtol=0)
    assert torch.equal(patch_matrix(s, "diag"), torch.diag(s))


def test_unit_scales_give_the_unpatched_pruned_model():
    dense = tiny_model("llama", num_layers=8, hidden_size=D)
    plain = drop_layers(copy.deepcopy(dense), [2, 3])
    patched = drop_layers(copy.deepcopy(dense), [2, 3])
    eye = patch_matrix(torch.ones(D), "rotate", hadamard(D))
    insert_patches(patched, {2: LinearPatch(eye, 2, 4, 8)})
    with torch.no_grad():
        torch.testing.assert_close(patched(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)


def test_linear_patch_keeps_dtype_and_is_trainable():
    p = LinearPatch(torch.eye(D) * 2, 0, 1, 4)
    x = torch.randn(3, D, dtype=torch.bfloat16)
    y = p(x)
    assert y.dtype == torch.bfloat16 and p.weight.dtype == torch.float32 and p.weight.requires_grad
    torch.testing.assert_close(y, (x.float() * 2).bfloat16())
    with pytest.raises(ValueError, match="square"):
        LinearPatch(torch.ones(2, 3), 0, 1, 4)


# --------------------------------------------------------------------------- placement
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("removed", [[1, 2, 5], [0, 1, 4, 7], [6, 7], [0]])
def test_patches_act_at_each_cut(arch, removed):
    dense, model, patches = pruned_patched(arch, removed)
    with torch.no_grad():
        got = model(input_ids=IDS, use_cache=False).logits
    torch.testing.assert_close(got, manual_forward(dense, removed, patches, IDS), atol=1e-5, rtol=1e-5)
    # and the patch matters: without it the logits differ
    unpatched = copy.deepcopy(model)
    strip_patches(unpatched)
    with torch.no_grad():
        assert not torch.allclose(unpatched(input_ids=IDS).logits, got, atol=1e-3)
    assert [p.start for p in find_patches(model)] == [a for a, _ in runs_of(removed)]
    dec = Decoder(model)
    assert isinstance(dec.norm, Patched) == (removed[-1] == 7)


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_greedy_generation_with_cache_equals_without(arch):
    _, model, _ = pruned_patched(arch, [0, 3, 4, 7])
    prompt = IDS[:1, :6]
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=258)
    with torch.no_grad():
        a = model.generate(prompt, use_cache=True, **kw)
        b = model.generate(prompt, use_cache=False, **kw)
    assert a.shape == (1, 18) and torch.equal(a, b)


def test_insert_before_drop_layers_is_an_error():
    model = tiny_model("llama", num_layers=8, hidden_size=D)
    with pytest.raises(ValueError, match="the model has 8 layers but cuts .* leave 6; call it after drop_layers"):
        insert_patches(model, random_patches([1, 5], 8))


# --------------------------------------------------------------------------- build_patches
def test_build_patches_uses_dense_scales_per_run(tmp_path):
    dense = tiny_model("llama", num_layers=8, hidden_size=D, seed=2)
    windows = torch.randint(0, 256, (4, 10), generator=torch.Generator().manual_seed(3))
    h = naive_states(dense, windows)
    from omegaconf import OmegaConf

    for kind in ("rotate", "diag"):
        cfg = OmegaConf.create({"kind": kind, "hadamard_fallback_seed": None})
        patches, info = build_patches(make_ctx(dense, windows, {}), [1, 2, 5], cfg)
        assert sorted(patches) == [1, 5] and info["params"] == 2 * D * D and info["kind"] == kind
        for (a, b), cut in zip([(1, 3), (5, 6)], info["cuts"], strict=True):
            s = naive_scales(h, a, b, kind)
            H = hadamard(D, dtype=torch.float64) if kind == "rotate" else torch.eye(D, dtype=torch.float64)
            torch.testing.assert_close(patches[a].weight.double(), H @ torch.diag(s) @ H.T, atol=1e-4, rtol=1e-4)
            assert (cut["start"], cut["end"]) == (a, b)
            assert cut["scale_min"] == pytest.approx(s.min().item(), abs=1e-4)
            assert cut["scale_max"] == pytest.approx(s.max().item(), abs=1e-4)


# --------------------------------------------------------------------------- run(cfg)


def test_run_linearpatch_rotate_and_diag_end_to_end(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    lp3 = ["pruner=linearpatch", "pruner.n=3", "pruner.variant=paper"]
    none = run(cfg_factory(*SMALL, *lp3))
    rot = run(cfg_factory(*SMALL, *lp3, "patch=rotate", "patch.save=true"))
    diag = run(cfg_factory(*SMALL, *lp3, "patch=diag"))
    removed = none["pruning"]["removed_layers"]
    assert len(removed) == 3 and removed == rot["pruning"]["removed_layers"] == diag["pruning"]["removed_layers"]
    start = removed[0]
    assert removed == list(range(start, start + 3))
    curve = rot["pruning"]["scores"]
    assert curve["kind"] == "cosine_by_start" and len(curve["values"]) == 8 - 3 + 1
    assert max(range(6), key=lambda i: curve["values"][i]) == start
    for r, kind in ((rot, "rotate"), (diag, "diag")):
        p, pr = r["patch"], r["pruning"]
        assert p["kind"] == kind and p["num_patches"] == 1 and p["params"] == D * D
        assert (p["cuts"][0]["start"], p["cuts"][0]["end"]) == (start, start + 3)
        assert 0 < p["cuts"][0]["scale_min"] <= p["cuts"][0]["scale_median"] <= p["cuts"][0]["scale_max"]
        assert pr["params_patch"] == D * D and pr["params_pruned"] == none["pruning"]["params_pruned"]
        assert pr["pruned_ratio_with_patch"] == pytest.approx(
            1 - (pr["params_pruned"] + D * D) / pr["params_dense"])
        assert pr["pruned_ratio_with_patch"] < pr["pruned_ratio"]
        assert p["calibration"]["cached"] is True  # the selection already computed (and cached) the stats
        assert r["data"]["calibration"]["corpus"] == "ptb"
    assert none["pruning"]["calibration"]["cached"] is False and rot["pruning"]["calibration"]["cached"] is True
    ppl = {k: r["metrics"]["ppl/ptb"] for k, r in (("none", none), ("rotate", rot), ("diag", diag))}
    assert all(math.isfinite(v) for v in ppl.values()) and len(set(ppl.values())) == 3
    # the saved model reproduces the run's perplexity without the original checkpoint
    model, tok = load_pruned(rot["saved_model"])
    windows, _ = data.eval_windows(tok, "ptb", "test", 64, str(DATA), "auto", 4)
    assert perplexity(model, windows, 4, progress=False) == pytest.approx(ppl["rotate"], rel=1e-6)


def test_run_unsupported_hidden_size(cfg_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    odd = [*SMALL, "pruner=linearpatch", "pruner.n=2", "patch=rotate", "model.tiny.hidden_size=184"]
    with pytest.raises(ValueError, match="patch=rotate: No Hadamard matrix construction for D = 184"):
        run(cfg_factory(*odd))
    assert "load" not in json.loads((tmp_path / "result.json").read_text())["timing"]
    ok = run(cfg_factory(*odd, "patch.hadamard_fallback_seed=0"))
    assert ok["patch"]["rotation"] == "random_orthogonal:0" and ok["patch"]["params"] == 184 * 184
    assert run(cfg_factory(*odd[:-1], "patch=diag"))["patch"]["kind"] == "diag"  # diag needs no rotation


def test_run_records_basis_and_keeps_a_calibration_cache_entry_per_basis(cfg_factory, tmp_path, monkeypatch):
    """D = 96: the official matrix (T_12^T kron S_8) differs from lp's (S_8 kron Paley 12)."""
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    base = [*SMALL, "pruner=linearpatch", "pruner.n=2", "patch=rotate", "model.tiny.hidden_size=96"]
    runs = {name: run(cfg_factory(*base, *extra)) for name, extra in (
        ("constructed", []), ("official", ["patch.hadamard=official"]),
        ("random", ["patch.hadamard=random", "patch.hadamard_seed=4"]))}
    start = runs["constructed"]["patch"]["cuts"][0]["start"]
    for name, r in runs.items():
        p = r["patch"]
        assert (p["hadamard"], p["rotation"]) == (name, name if name != "random" else "random:4")
        assert p["hadamard_seed"] == (4 if name == "random" else None)
        assert r["pruning"]["calibration"]["cached"] is False  # one cache entry per basis, never another's
        assert p["cuts"][0]["start"] == start  # the selection does not depend on the basis
    assert len({r["metrics"]["ppl/ptb"] for r in runs.values()}) == 3
    again = run(cfg_factory(*base, "patch.hadamard=official"))
    assert again["pruning"]["calibration"]["cached"] is True and again["metrics"] == runs["official"]["metrics"]
    with pytest.raises(ValueError, match="patch.hadamard_seed=1 is only used by the random bases"):
        run(cfg_factory(*base, "patch.hadamard_seed=1"))


@pytest.mark.parametrize("overrides, msg", [
    (["pruner=linearpatch", "pruner.n=0"], "pruner=linearpatch.*n=0 is out of range"),
    (["pruner=linearpatch", "pruner.n=8"], "n=8 is out of range for a model of L=8"),
    (["pruner=shortgpt", "pruner.n=8"], "pruner=shortgpt.*n=8 is out of range"),
    (["pruner=linearpatch", "pruner.n=7", "pruner.variant=reference"], "first and last layers are never removed"),
    (["pruner=none", "patch=rotate"], "patch=rotate needs layers to remove, but pruner=none"),
    (["pruner=linearpatch", "pruner.n=2", "patch=rotate", "patch.hadamard_fallback_seed=abc"],
     "hadamard_fallback_seed='abc' must be null or an integer"),
])
def test_run_bad_input_fails_before_loading(cfg_factory, overrides, msg):
    with pytest.raises(ValueError, match=msg):
        preflight(cfg_factory(*SMALL, *overrides))


def test_pruned_ratio_counts_each_patch_as_d_squared_like_the_paper():
    """Paper example: Llama-2-7B, 7 of 32 layers removed: 21.02% -> 20.78% with one patch (D^2 params)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lp.models import count_params

    cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    dense = count_params(model)
    drop_layers(model, range(22, 29))
    pruned = count_params(model)
    with torch.device("meta"):
        insert_patches(model, {22: LinearPatch(torch.eye(4096), 22, 29, 32)})
    patch = count_params(model) - pruned
    assert patch == 4096 ** 2
    assert round(100 * (1 - pruned / dense), 2) == 21.02
    assert round(100 * (1 - (pruned + patch) / dense), 2) == 20.78


@pytest.mark.real
def test_real_smollm2_patch_lowers_perplexity(cfg_factory):
    """SmolLM2-135M, the cosine-selected 3-layer block: both patches beat the unpatched block."""
    small = ["model=smollm2_135m", "calib.corpus=wikitext2", "calib.split=validation", "calib.nsamples=4",
             "calib.seqlen=512", "calib.batch_size=2", "eval=quick", "eval.ppl.datasets=[wikitext2]",
             "eval.ppl.max_windows=2", "eval.ppl.progress=false", "pruner=linearpatch", "pruner.n=3",
             "calib.nval=0"]  # the patches' own effect: no held-out verification (tested on the tiny model)
    ppl = {kind: run(cfg_factory(*small, f"patch={kind}"))["metrics"]["ppl/wikitext2"]
           for kind in ("none", "diag", "rotate")}
    assert ppl["diag"] < ppl["none"] and ppl["rotate"] < ppl["none"], ppl


def test_build_patches_refuses_scales_of_another_basis():
    from omegaconf import OmegaConf

    dense = tiny_model("llama", num_layers=4, hidden_size=96, seed=2)
    windows = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    cfg = OmegaConf.create({"kind": "rotate", "hadamard": "official", "hadamard_seed": None,
                            "hadamard_fallback_seed": None})
    with pytest.raises(ValueError, match="rotated by 'constructed' but the patch uses basis 'official'"):
        build_patches(make_ctx(dense, windows, {}), [1], cfg)
