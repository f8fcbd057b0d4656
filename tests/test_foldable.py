"""Foldable patches (`lstsq_mlp`, `rotate_mlp`: T on the last kept layer's MLP output, folded into its
down_proj) and `patch.foldable`: the fit against a naive computation, the held-out replay and distillation
with the patch in place, exact folds that stock `from_pretrained` reloads, and the early errors."""

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from test_calib import make_ctx
from test_distill import dcfg
from test_export import load_in_fresh_process, logits
from test_patch import D

from lp import distill as Dist
from lp import verify
from lp.evaluate.ppl import window_nll
from lp.export import VERIFY_TOL, fold_refusal, save_pruned
from lp.hadamard import hadamard
from lp.models import Decoder, byte_tokenizer, count_params, drop_layers, load_model, tiny_model
from lp.patch import (
    LinearPatch,
    OutputPatched,
    check_patch,
    find_patches,
    fit_patches,
    insert_patches,
    runs_of,
)
from lp.run import run

L = 8
TOL = VERIFY_TOL[torch.float32]  # max |logit diff| / max |logit|: Gemma's diagonal fold, (c + w) t - c vs N(y) t


def cfg(kind="lstsq_mlp", **kw):
    return OmegaConf.create({"kind": kind, "hadamard_fallback_seed": None, "ridge": 1e-4, "verify": [], **kw})


def rel_diff(got, want) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def mlp_patch(a, b, seed, kind="lstsq_mlp", diagonal=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.diag(0.5 + 1.5 * torch.rand(D, generator=g)) if diagonal else \
        1.5 * torch.eye(D) + 0.5 * torch.randn(D, D, generator=g) / D ** 0.5
    return LinearPatch(w, a, b, L, kind)


def states(model, windows, a, b):
    """Dense h_a, h_b and M = layer a-1's MLP output, float64 [N*T, D] each (plain forward + hooks)."""
    dec, got = Decoder(model), {}
    hooks = [dec.layers[a - 1].mlp.register_forward_hook(lambda _m, _i, out: got.__setitem__("m", out)),
             dec.layers[a].register_forward_pre_hook(lambda _m, args: got.__setitem__("a", args[0])),
             (dec.layers[b] if b < L else dec.norm).register_forward_pre_hook(lambda _m, args: got.__setitem__("b", args[0]))]
    with torch.no_grad():
        model(input_ids=windows)
    for h in hooks:
        h.remove()
    return [got[k].reshape(-1, D).double() for k in ("a", "b", "m")]


@pytest.fixture(scope="module")
def dense():
    model = tiny_model("llama", num_layers=L, hidden_size=D, seed=4)
    windows = torch.randint(0, 256, (6, 16), generator=torch.Generator().manual_seed(2))
    return model, windows


# --------------------------------------------------------------------------- fit
@pytest.mark.parametrize("ridge", [0.0, 1e-2])
def test_lstsq_mlp_and_rotate_mlp_against_a_naive_least_squares(dense, ridge):
    model, windows = dense
    fitted, info = fit_patches(make_ctx(model, windows, {}), [3, 4], cfg(ridge=ridge), ["lstsq_mlp", "rotate_mlp"])
    ha, hb, m = states(model, windows, 3, 5)
    Y = hb - ha + m  # (h_a - M) + M T = h_b  <=>  M T = Y
    lam = ridge * (m * m).sum() / D
    A = torch.cat([m, lam.sqrt() * torch.eye(D, dtype=m.dtype)])  # ridge as extra rows
    want = torch.linalg.lstsq(A, torch.cat([Y, torch.zeros(D, D, dtype=Y.dtype)]), driver="gelsd").solution
    T = fitted["lstsq_mlp"][3].weight.double()
    # float32 activations, float64 normal equations vs a float64 QR: agreement to ~1e-4 of |T|
    torch.testing.assert_close(T, want, atol=2e-4 * want.abs().max().item(), rtol=2e-4)
    assert info["cuts"]["lstsq_mlp"][0]["tokens"] == m.shape[0] and fitted["lstsq_mlp"][3].site == "mlp"
    # rotate_mlp: per Hadamard direction c, s_c = <(MH)_c, (YH)_c> / (|(MH)_c|^2 + lam)
    H = hadamard(D, dtype=torch.float64)
    mh, yh = m @ H, Y @ H
    s = (mh * yh).sum(0) / ((mh * mh).sum(0) + lam)
    R = fitted["rotate_mlp"][3].weight.double()
    torch.testing.assert_close(R, H @ torch.diag(s) @ H.T, atol=2e-4 * R.abs().max().item(), rtol=2e-4)

    def objective(P):  # what both minimise (rotate_mlp over H diag(s) H^T only): never below lstsq_mlp
        return ((m @ P - Y) ** 2).sum() + lam * (P ** 2).sum()
    assert objective(T) <= objective(R) * (1 + 1e-6)
    assert objective(T) < objective(torch.eye(D, dtype=torch.float64))  # T = I is the unpatched model


def test_a_cut_at_layer_0_and_a_post_feedforward_norm_are_clear_errors_before_fitting(dense):
    model, windows = dense
    ctx = make_ctx(model, windows, {})
    for kind in ("lstsq_mlp", "rotate_mlp"):
        with pytest.raises(ValueError, match=rf"patch={kind} cannot bridge the cut \[0, 2\): the cut starts at layer 0"):
            fit_patches(ctx, [0, 1, 5], cfg(kind), [kind])
    gemma = tiny_model("gemma3_text", num_layers=L, hidden_size=D)
    with pytest.raises(ValueError, match=r"normalises the MLP output \(post_feedforward_layernorm\).*full D x D"):
        fit_patches(make_ctx(gemma, windows, {}), [3, 4], cfg(), ["lstsq_mlp"])
    with pytest.raises(ValueError, match="needs a kept layer before the cut"):
        LinearPatch(torch.eye(D), 0, 2, L, "lstsq_mlp")


# --------------------------------------------------------------------------- in memory
@pytest.mark.parametrize("removed", [[3, 4], [1, 2, 6, 7], [2, 5]])
def test_heldout_replay_equals_the_pruned_model_with_the_mlp_patch(dense, removed):
    model, windows = dense
    ps = {a: mlp_patch(a, b, i, kind) for i, ((a, b), kind) in
          enumerate(zip(runs_of(removed), ["lstsq_mlp", "rotate_mlp"], strict=False))}
    held = verify.Heldout(model, windows, batch_size=4)
    got = held.nll(removed, ps)
    pruned = insert_patches(drop_layers(copy.deepcopy(model), removed), copy.deepcopy(ps))
    assert isinstance(Decoder(pruned).layers[removed[0] - 1].mlp.down_proj, OutputPatched)
    # the same float32 layers in the same batches; only the NLL reduction order differs
    assert got == pytest.approx(window_nll(pruned, windows, 4, progress=False).mean().item(), abs=1e-5)
    unpatched = window_nll(drop_layers(copy.deepcopy(model), removed), windows, 4, progress=False).mean().item()
    assert abs(got - unpatched) > 1e-3  # the patch is really applied
    assert held.nll(removed) == pytest.approx(unpatched, abs=1e-5)  # the replay left the dense model unpatched
    assert not find_patches(model)


# --------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch,over", [("llama", {}), ("llama", {"mlp_bias": True}), ("qwen2", {}), ("mistral", {})])
def test_folded_mlp_patches_reload_with_stock_from_pretrained_in_a_fresh_process(tmp_path, arch, over):
    """lstsq_mlp / rotate_mlp at one or three cuts, alone and beside a folded scalar, give a plain checkpoint:
    no modeling_lp.py, no auto_map, stock from_pretrained (lp not importable) gives the in-memory logits."""
    cases = {"one": ([3, 4], ["lstsq_mlp"]), "three": ([1, 2, 4, 6, 7], ["rotate_mlp", "lstsq_mlp", "lstsq_mlp"]),
             "with_scalar": ([2, 3, 5], ["scalar", "lstsq_mlp"])}
    models, jobs = {}, {}
    for name, (removed, kinds) in cases.items():
        model = drop_layers(tiny_model(arch, num_layers=L, hidden_size=D, **over), removed)
        ps = {a: (LinearPatch(1.3 * torch.eye(D), a, b, L, "scalar") if k == "scalar" else mlp_patch(a, b, i, k))
              for i, ((a, b), k) in enumerate(zip(runs_of(removed), kinds, strict=True))}
        models[name] = insert_patches(model, ps)
        path = save_pruned(model, byte_tokenizer(), tmp_path / name)
        info = json.loads((path / "lp_patch.json").read_text())
        config = json.loads((path / "config.json").read_text())
        assert info["mode"] == "folded" and not (path / "modeling_lp.py").exists() and "auto_map" not in config
        assert config["num_hidden_layers"] == L - len(removed) and config["model_type"] == arch
        assert [c["kind"] for c in info["cuts"]] == kinds and all(c["folded_into"] for c in info["cuts"])
        jobs[name] = (path, "stock")
    report = load_in_fresh_process(tmp_path, jobs)
    for name, model in models.items():
        assert report[name]["ok"] and report[name]["class"] == type(model).__name__, report[name]
        got = load_file(str(tmp_path / "fresh" / f"{name}.safetensors"))["logits"]
        want = logits(model)
        if name == "with_scalar":  # the scalar fold is exact up to the RMSNorm eps (test_export)
            assert rel_diff(got, want) <= 1e-3, rel_diff(got, want)
        else:  # in memory, T^T W is computed by the same function the export folds with: the same bits
            assert torch.equal(got, want), (name, rel_diff(got, want))
        assert rel_diff(got, logits(strip(model))) > 1e-2  # and the fold is not a no-op


def strip(model):
    from lp.patch import strip_patches

    m = copy.deepcopy(model)
    strip_patches(m)
    return m


def test_gemma3_diagonal_t_folds_into_the_post_feedforward_norm_and_full_t_is_refused(tmp_path):
    removed = [3, 4]
    model = drop_layers(tiny_model("gemma3_text", num_layers=L, hidden_size=D), removed)
    with torch.no_grad():  # Gemma's norm weight is a delta from 1: make it matter
        Decoder(model).layers[2].post_feedforward_layernorm.weight.normal_(0, 0.3)
    full = {3: mlp_patch(3, 5, 0)}
    assert "does not fold into that norm's weight" in fold_refusal(model, full)
    insert_patches(model, {3: mlp_patch(3, 5, 0, diagonal=True)})
    path = save_pruned(model, byte_tokenizer(), tmp_path / "g")  # verified against the in-memory model
    config = json.loads((path / "config.json").read_text())
    assert json.loads((path / "lp_patch.json").read_text())["mode"] == "folded" and "auto_map" not in config
    dense_types = tiny_model("gemma3_text", num_layers=L, hidden_size=D).config.layer_types
    assert config["layer_types"] == [t for i, t in enumerate(dense_types) if i not in removed]
    report = load_in_fresh_process(tmp_path, {"g": (path, "stock")})
    got = load_file(str(tmp_path / "fresh" / "g.safetensors"))["logits"]
    assert report["g"]["ok"] and rel_diff(got, logits(model)) <= TOL
    insert_full = insert_patches(strip(model), full)
    with pytest.raises(ValueError, match="cannot save the lstsq_mlp patch"):
        save_pruned(insert_full, None, tmp_path / "full")


def test_mlp_patch_beside_a_custom_class_patch_folds_and_reloads(tmp_path):
    from lp import load_pruned

    removed = [2, 5, 6]
    model = drop_layers(tiny_model("llama", num_layers=L, hidden_size=D), removed)
    g = torch.Generator().manual_seed(1)
    rot = LinearPatch(torch.eye(D) + 0.2 * torch.randn(D, D, generator=g) / D ** 0.5, 2, 3, L, "rotate")
    insert_patches(model, {2: rot, 5: mlp_patch(5, 7, 3)})
    path = save_pruned(model, byte_tokenizer(), tmp_path / "m")
    info = json.loads((path / "lp_patch.json").read_text())
    assert info["mode"] == "custom" and [("module" in c, "folded_into" in c) for c in info["cuts"]] == [(True, False), (False, True)]
    again, _ = load_pruned(path)
    assert [p.kind for p in find_patches(again)] == ["rotate"]  # the mlp patch lives in down_proj now
    assert torch.equal(logits(again), logits(model))  # same bits: the fold is the in-memory arithmetic


# --------------------------------------------------------------------------- distillation
def test_distillation_trains_the_mlp_patch_and_its_fold_stays_exact(dense, tmp_path):
    model, _ = dense
    windows = torch.randint(0, 256, (10, 24), generator=torch.Generator().manual_seed(0))
    cache = Dist.build_teacher(model, windows, ntrain=8, k=8, key={"test": "fold"}, root=tmp_path, batch_size=3,
                               progress=False)
    student = insert_patches(drop_layers(copy.deepcopy(model), [3, 4]), {3: mlp_patch(3, 5, 0)})
    before = {n: q.detach().clone() for n, q in student.named_parameters()}
    info = Dist.distill(student, cache, dcfg(lr=1e-2, seqlen=24))
    (p,) = find_patches(student)
    after = dict(student.named_parameters())
    assert [n for n in before if not torch.equal(before[n], after[n])] == ["model.layers.2.mlp.down_proj.patch.weight"]
    assert info["patch_rel_change"][0] > 1e-3  # only the matrix after down_proj trained, and it did
    path = save_pruned(student, None, tmp_path / "m")  # verified against the in-memory model
    assert json.loads((path / "lp_patch.json").read_text())["mode"] == "folded"
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(path)
    assert torch.equal(logits(back), logits(student))  # the trained T, folded with the in-memory arithmetic


# --------------------------------------------------------------------------- patch.foldable / run
def test_foldable_settings_are_checked_before_loading(cfg_factory):
    with pytest.raises(ValueError, match="patch.foldable=true but patch=rotate does not fold"):
        check_patch(cfg("rotate", foldable=True), D)
    with pytest.raises(ValueError, match=r"leaves none of patch.candidates=\['diag', 'lstsq'\]"):
        check_patch(cfg("auto", candidates=["diag", "lstsq"], foldable=True), D)
    with pytest.raises(ValueError, match="patch.foldable='yes' must be true or false"):
        check_patch(cfg("auto", candidates=["none"], foldable="yes"), D)
    for over, msg in [(["patch=lstsq", "patch.foldable=true"], "does not fold"),
                      (["patch=lstsq_mlp", "pruner.layers=[0,1]"], "removes layer 0")]:
        c = cfg_factory("model=tiny_llama", "eval=quick", "pruner=manual", "pruner.layers=[2,3]", *over)
        with pytest.raises(ValueError, match=msg):
            run(c)


@pytest.mark.slow
@pytest.mark.parametrize("arch,layers", [("llama", "[2,3]"), ("llama", "[0,1,5]"), ("gemma3_text", "[2,3]")])
def test_run_auto_foldable_always_saves_a_plain_checkpoint(cfg_factory, tmp_path, monkeypatch, arch, layers):
    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    c = cfg_factory("model=tiny_llama", f"model.tiny.arch={arch}", "eval=quick", "eval.ppl.max_windows=2",
                    "eval.ppl.progress=false", "calib=quick", "calib.nsamples=4", "calib.seqlen=64",
                    "pruner=manual", f"pruner.layers={layers}", "patch=auto", "patch.foldable=true",
                    "patch.save=true", "eval.generate=null", f"paths.output_dir={tmp_path / 'run'}")
    res = run(c)
    folder = tmp_path / "run" / "model"
    config = json.loads((folder / "config.json").read_text())
    assert res["export"]["mode"] in ("plain", "folded") and not (folder / "modeling_lp.py").exists()
    assert "auto_map" not in config and config["model_type"] == arch
    ver = res["patch"]["verification"]
    chosen = {c["kind"] for c in ver["choice"]}
    assert chosen <= {"none", "scalar", "lstsq_mlp", "rotate_mlp"}
    assert all(set(c["candidates"]) <= {"none", "scalar", "lstsq_mlp", "rotate_mlp"} for c in ver["choice"])
    if layers == "[0,1,5]" or arch == "gemma3_text":  # mlp kinds cannot bridge a cut at 0 / fold on gemma
        assert all(set(c["candidates"]) <= {"none", "scalar"} for c in ver["choice"])
    if arch == "gemma3_text":  # scalar does not fold through sandwich norms either
        assert chosen == {"none"} and res["export"]["mode"] == "plain"
    from transformers import AutoModelForCausalLM

    # stock from_pretrained, no remote code: the held-out NLL of the patches auto chose, in memory
    back = AutoModelForCausalLM.from_pretrained(folder)
    windows = verify.heldout_windows(c, load_model(c.model)[1])
    assert len(windows) == ver["windows"]
    nll = window_nll(back, windows, c.calib.batch_size, progress=False).mean().item()
    # the parameter accounting: a plain checkpoint holds the pruned model's own parameters only, and the
    # mlp-site patches (D x D each) are counted as folded, so they do not lower the pruned ratio
    pr, D = res["pruning"], res["model"]["hidden_size"]
    assert count_params(back) == pr["params_pruned"]
    assert pr["params_patch_folded"] == D * D * sum(c["kind"] in ("lstsq_mlp", "rotate_mlp") for c in ver["choice"])
    if chosen <= {"none", "lstsq_mlp", "rotate_mlp"}:
        assert pr["pruned_ratio_with_patch"] == pytest.approx(pr["pruned_ratio"], abs=1e-12)
    # exact for mlp-site folds; a scalar fold moves logits by the RMSNorm eps effect (recorded, small here)
    assert res["export"].get("fold_deviation", 0.0) <= 1e-3
    assert nll == pytest.approx(ver["chosen_nll"], abs=1e-3)


def test_card_says_which_kind_folds_where_and_why(tmp_path):
    from lp.card import write_card

    model = insert_patches(drop_layers(tiny_model("llama", num_layers=L, hidden_size=D), [3, 4]), {3: mlp_patch(3, 5, 0)})
    path = save_pruned(model, byte_tokenizer(), tmp_path / "m")
    text = write_card(path, {"name": "t", "patch": {"kind": "lstsq_mlp"}}).read_text()
    assert "| [3, 5) | lstsq_mlp | model.layers.2.mlp.down_proj (W <- T^T W, b <- b T) | lstsq_mlp multiplies" in text
    assert "`folded` layout" in text and "trust_remote_code" not in text
