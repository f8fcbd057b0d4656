"""Output-KL distillation of the patch (`lp.distill`) on tiny random models."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lp import distill as D
from lp.export import load_pruned, save_pruned
from lp.hadamard import hadamard
from lp.models import drop_layers, tiny_model
from lp.patch import (
    LinearPatch,
    find_patches,
    insert_patches,
    patch_matrix,
    runs_of,
)

CONF = Path(__file__).resolve().parents[1] / "conf" / "distill"
L, DIM, T, K = 6, 64, 24, 8


def dcfg(lr=None, schedule=None, **over):
    """`conf/distill/output_kl.yaml` with test-sized overrides (`lr`: the optimizer's; `schedule="constant"`:
    the cosine schedule with its floor at 1, i.e. a constant lr)."""
    base = dict(nsamples=8, nval=2, seqlen=T, k=K, batch_size=2, autocast="none", progress=False)
    if lr is not None:
        base["optimizer"] = {"lr": lr}
    if schedule == "constant":
        base["scheduler"] = {"min_lr_rate": 1.0}
    return OmegaConf.merge(OmegaConf.load(CONF / "output_kl.yaml"), {**base, **over})


def patched(dense, removed, seed=0):
    """A pruned copy of `dense` with one rotate-style patch H diag(s) H^T per cut (random s)."""
    student = copy.deepcopy(dense)
    drop_layers(student, removed)
    g = torch.Generator().manual_seed(seed)
    H = hadamard(dense.config.hidden_size)
    patches = {a: LinearPatch(patch_matrix(0.8 + 0.4 * torch.rand(H.shape[0], generator=g), "rotate", H), a, b, L)
               for a, b in runs_of(removed)}
    return insert_patches(student, patches)


def windows(n=10, seed=0):
    return torch.randint(0, 256, (n, T), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def dense():
    return tiny_model("llama", L, DIM, seed=0)


@pytest.fixture
def cache(dense, tmp_path):
    return D.build_teacher(dense, windows(), ntrain=8, k=K, key={"test": 1}, root=tmp_path, batch_size=3,
                           progress=False)


def direct_topk(model, ids):
    with torch.no_grad():
        top = model(input_ids=ids, use_cache=False).logits.topk(K, dim=-1)
    return top.indices, top.values


# ----------------------------------------------------------------------------- teacher cache
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_cache_round_trips_exactly(dense, tmp_path, dtype):
    model = copy.deepcopy(dense).to(dtype)
    win = windows()
    cache = D.build_teacher(model, win, 8, K, {"dtype": str(dtype)}, root=tmp_path, batch_size=3, progress=False)
    ids, idx, vals = cache.get(range(len(win)))
    ref_idx, ref_vals = direct_topk(model, win)
    assert torch.equal(ids, win) and torch.equal(idx, ref_idx)
    assert vals.dtype == dtype and torch.equal(vals, ref_vals)  # bf16 logits stored bit-exactly
    assert (cache.ntrain, cache.nval, cache.k, cache.seqlen) == (8, 2, K, T)
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left


def test_shuffled_access_returns_the_right_windows(dense, cache):
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    ids, idx, vals = cache.get(perm)
    ref_idx, ref_vals = direct_topk(dense, windows()[perm])
    assert torch.equal(ids, windows()[perm]) and torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    one = cache.get([perm[4]])
    assert torch.equal(one[1][0], ref_idx[4])


def test_cache_is_reused_only_for_the_same_key(dense, tmp_path, cache):
    again = D.build_teacher(dense, windows(), 8, K, {"test": 1}, root=tmp_path, progress=False)
    assert again.path == cache.path
    other = D.build_teacher(dense, windows(), 8, K - 1, {"test": 2}, root=tmp_path, progress=False)
    assert other.path != cache.path and other.k == K - 1
    # an entry whose stored key differs from the requested one is never reused: it is rebuilt
    meta = json.loads((cache.path / "meta.json").read_text())
    meta["key"] = {"test": "tampered"}
    (cache.path / "meta.json").write_text(json.dumps(meta))
    rebuilt = D.build_teacher(dense, windows(), 8, K, {"test": 1}, root=tmp_path, progress=False)
    assert rebuilt.path == cache.path and rebuilt.meta["key"] == {"test": 1}


def test_teacher_key_changes_with_k_seed_and_model(cfg_factory):
    cfg = cfg_factory("model=tiny_llama", "distill=quick")
    prov = {"corpus": "wikitext2_tok", "split": "train", "source": "local", "tokens": 1000, "nsamples": 64,
            "nval": 4, "seqlen": 512, "seed": 2, "holdout": 0.1}
    base = D.teacher_key(cfg, prov, windows())
    h = D.key_hash(base)
    assert D.key_hash(D.teacher_key(cfg, prov, windows())) == h
    cfg_k = cfg_factory("model=tiny_llama", "distill=quick", "distill.k=20")
    assert D.key_hash(D.teacher_key(cfg_k, prov, windows())) != h
    assert D.key_hash(D.teacher_key(cfg, {**prov, "seed": 3}, windows())) != h
    assert D.key_hash(D.teacher_key(cfg, prov, windows(seed=1))) != h  # same settings, other windows
    cfg_m = cfg_factory("model=tiny_llama", "distill=quick", "model.tiny.seed=1")
    assert D.key_hash(D.teacher_key(cfg_m, prov, windows())) != h


def test_not_enough_disk_fails_before_writing(dense, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(OSError, match="not enough disk for the teacher cache"):
        D.build_teacher(dense, windows(), 8, K, {"disk": 1}, root=tmp_path, progress=False)
    assert list((tmp_path / "teacher").iterdir()) == []  # no entry, no temporary folder


def test_crash_while_writing_leaves_no_cache(dense, tmp_path):
    model = copy.deepcopy(dense)
    calls = {"n": 0}

    def boom(*_):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    handle = model.register_forward_pre_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        D.build_teacher(model, windows(), 8, K, {"crash": 1}, root=tmp_path, batch_size=3, progress=False)
    assert list((tmp_path / "teacher").iterdir()) == []  # no entry, no temporary folder
    handle.remove()
    cache = D.build_teacher(model, windows(), 8, K, {"crash": 1}, root=tmp_path, batch_size=3, progress=False)
    assert torch.equal(cache.get(range(10))[1], direct_topk(dense, windows())[0])


# ----------------------------------------------------------------------------- loss + suffix student
def test_topk_kl_matches_definition():
    s, t = torch.randn(3, 5, K), torch.randn(3, 5, K)
    p, q = t.softmax(-1), s.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()
    torch.testing.assert_close(D.topk_kl(s, t), ref)
    assert D.topk_kl(t + 3.0, t).abs() < 1e-6  # shift-invariant: same distribution on the support


@pytest.mark.parametrize("arch,removed", [("llama", [2, 3]), ("llama", [1, 4]), ("llama", [4, 5]),
                                          ("gemma3_text", [1, 2]), ("qwen2", [3])])
def test_suffix_student_equals_full_model_student(arch, removed):
    dense = tiny_model(arch, L, DIM, seed=1)
    student = patched(dense, removed)
    win = windows(3)
    idx, vals = direct_topk(dense, win)
    patches = find_patches(student)

    full = D.full_student_loss(student, win, idx, vals)
    g_full = torch.autograd.grad(full, [p.weight for p in patches])

    suffix = D.Suffix(student)
    h = suffix.prefix(win)
    assert not h.requires_grad
    loss = D.topk_kl(suffix.logits_at(suffix.hidden(h), idx), vals)
    g_suf = torch.autograd.grad(loss, [p.weight for p in patches])
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_suf, g_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # full logits of the suffix equal the model's, and a second batch of the same shape (early-stop path)
    win2 = windows(3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(suffix.logits(suffix.hidden(suffix.prefix(win2))),
                                   student(input_ids=win2, use_cache=False).logits, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- training
def test_only_patch_parameters_train_and_flags_are_restored(dense, cache):
    student = patched(dense, [2, 3])
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    info = D.distill(student, cache, dcfg(lr=1e-2))
    patch_names = {n for n, _ in student.named_parameters() if ".patch." in n}
    assert patch_names == {"model.layers.2.patch.weight"}
    for n, p in student.named_parameters():
        assert p.requires_grad == flags[n]
        if n in patch_names:
            assert not torch.equal(p, before[n]) and p.dtype == torch.float32
        else:
            assert torch.equal(p, before[n]) and p.grad is None, n
    rel = (student.model.layers[2].patch.weight - before["model.layers.2.patch.weight"]).norm() \
        / before["model.layers.2.patch.weight"].norm()
    assert info["patch_rel_change"] == [pytest.approx(rel.item(), rel=1e-5)]
    assert info["steps"] == 4 and len(info["val"]) == 2


def test_loss_decreases(dense, cache):
    student = patched(dense, [2, 3])
    info = D.distill(student, cache, dcfg(lr=3e-2, epochs=6, val_every=4, schedule="constant"))
    curve = info["train_loss"]["mean_between_val_points"]
    assert info["steps"] == 24 and len(curve) == 6
    assert curve[-1] < 0.8 * curve[0]


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_schedule_from_yaml_is_the_cosine_to_a_floor(dense, cache, schedule):
    """conf/distill/output_kl.yaml's transformers schedule gives lr * (r + (1-r)/2 (1 + cos(pi s / S)))
    after step s of S (r = min_lr_rate = 0.05; 1.0 = constant), the hand-written lambda it replaced."""
    lrs = {}

    class Rec:
        def log(self, metrics, step=None):
            if "distill/lr" in metrics:
                lrs[step] = metrics["distill/lr"]

    info = D.distill(patched(dense, [2, 3]), cache, dcfg(lr=1e-2, epochs=3, schedule=schedule), tracker=Rec())
    total, r = info["planned_steps"], (0.05 if schedule == "cosine" else 1.0)
    assert sorted(lrs) == list(range(1, total + 1)) and total == 12
    for s, lr in lrs.items():
        assert lr == pytest.approx(1e-2 * (r + (1 - r) * 0.5 * (1 + math.cos(math.pi * s / total))), rel=1e-12, abs=0)
    assert lrs[total] == pytest.approx(1e-2 * r, rel=1e-12)


def test_keep_best_restores_the_best_validation_patch(dense, cache):
    student = patched(dense, [2, 3])
    info = D.distill(student, cache, dcfg(lr=0.3, epochs=2, batch_size=1, val_every=4, keep="best"))
    losses = [v["loss"] for v in info["val"]]
    assert info["val_loss_final"] == min(losses)
    assert info["kept_step"] == info["val"][losses.index(min(losses))]["step"]
    ids, idx, vals = cache.get(range(8, 10))  # recompute the kept patch's validation loss independently
    with torch.no_grad():
        again = D.full_student_loss(student, ids, idx, vals).item()
    assert again == pytest.approx(info["val_loss_final"], rel=1e-4)


def test_recomputed_prefix_equals_cached_prefix(dense, cache):
    a, b = patched(dense, [2, 3]), patched(dense, [2, 3])
    ia = D.distill(a, cache, dcfg(lr=1e-2, batch_size=3))
    ib = D.distill(b, cache, dcfg(lr=1e-2, batch_size=3, prefix_cache_gb=0))
    assert ia["prefix_cached"] and not ib["prefix_cached"]
    torch.testing.assert_close(a.model.layers[2].patch.weight, b.model.layers[2].patch.weight)
    assert ia["train_loss"]["last"] == pytest.approx(ib["train_loss"]["last"], rel=1e-5)


def test_early_stopping_and_tracker(dense, cache):
    logged = []

    class Rec:
        def log(self, metrics, step=None):
            logged.append((step, dict(metrics)))

    student = patched(dense, [2, 3])
    info = D.distill(student, cache, dcfg(lr=5.0, batch_size=1, epochs=5, val_every=1, patience=2), tracker=Rec())
    assert info["stopped_early"] and info["steps"] < info["planned_steps"]
    train = [s for s, m in logged if "distill/loss" in m]
    assert train == list(range(1, info["steps"] + 1))
    assert [s for s, m in logged if "distill/val_loss" in m] == [v["step"] for v in info["val"]]


def test_distilled_patch_saves_and_reloads(dense, cache, tmp_path):
    student = patched(dense, [4, 5])  # cut at the end: the patch wraps the final norm
    D.distill(student, cache, dcfg(lr=1e-2))
    save_pruned(student, None, tmp_path / "m")
    again, _ = load_pruned(tmp_path / "m")
    torch.testing.assert_close(find_patches(again)[0].weight, find_patches(student)[0].weight, rtol=0, atol=0)
    win = windows(2)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=win).logits, student(input_ids=win).logits)


def test_no_patch_is_an_error(dense, cache):
    pruned = drop_layers(copy.deepcopy(dense), [2, 3])
    with pytest.raises(ValueError, match="no patched module"):
        D.distill(pruned, cache, dcfg())


@pytest.mark.parametrize("over,match", [
    ({"keep": "first"}, "distill.keep='first'"), ({"k": 0}, "distill.k=0"),
    ({"nval": 0, "keep": "best"}, "need validation windows"), ({"autocast": "fp8"}, "distill.autocast"),
    ({"scheduler": {"min_lr_rate": 2}}, r"distill.scheduler.min_lr_rate=2 must be in \[0, 1\]"),
    ({"optimizer": {"lr": 0}}, "distill.optimizer.lr=0 must be > 0"),
    ({"optimizer": {"_target_": "torch.optim.Adamw"}}, "distill.optimizer._target_='torch.optim.Adamw' cannot be imported"),
    ({"scheduler": {"_partial_": False}}, "distill.scheduler needs a `_target_` and `_partial_: true`"),
    ({"scheduler": {"num_training_steps": 9}}, "num_training_steps is set by the loop"),
    ({"grad_clip": 0}, "distill.grad_clip=0 must be null or > 0"),
])
def test_bad_settings_are_rejected(over, match):
    with pytest.raises(ValueError, match=match):
        D.check_config(dcfg(**over))


@pytest.mark.parametrize("patch, msg", [
    (["patch=none"], "distill=output_kl needs a patch to train, but patch=none; use patch=rotate"),
    (["patch=auto", "patch.candidates=[none]"],
     r"distill=output_kl needs a patch to train, but patch=auto with patch.candidates=\['none'\] can only choose none"),
])
def test_run_rejects_distill_without_patch_before_loading(cfg_factory, patch, msg):
    from lp.run import preflight

    cfg = cfg_factory("model=tiny_llama", "eval=quick", "pruner=manual", "pruner.layers=[2,3]", "distill=quick",
                      "calib.nval=2", *patch)
    with pytest.raises(ValueError, match=msg):
        preflight(cfg)


@pytest.mark.slow
def test_run_auto_choosing_no_patch_skips_distill_with_a_warning(cfg_factory, tmp_path, monkeypatch, caplog, capsys):
    """patch=auto may choose no patch at every cut (here: every patch made worse on the held-out
    windows); distillation then has nothing to train: skipped with a loud warning, not an error."""
    from conftest import SMALL

    from lp import verify
    from lp.run import run

    nll = verify.Heldout.window_nll
    monkeypatch.setattr(verify.Heldout, "window_nll", lambda self, removed, patches=None: nll(self, removed, patches) + (
        1.0 if any(p is not None for p in (patches or {}).values()) else 0.0))
    cfg = cfg_factory(*SMALL, "pruner=manual", "pruner.layers=[2,3]", "patch=auto", "calib.nval=2",
                      "distill=quick", "distill.nsamples=4", "distill.nval=2", "distill.seqlen=64",
                      "distill.progress=false")
    with caplog.at_level("WARNING"):
        result = run(cfg)
    reason = "patch=auto chose no patch at any cut: nothing to train"
    warning = f"distill=output_kl skipped: {reason}; the run is training-free and unpatched"
    assert result["status"] == "ok" and result["distill"] == {"skipped": reason}
    assert result["patch"]["num_patches"] == 0 and [c["kind"] for c in result["patch"]["verification"]["choice"]] == ["none"]
    assert warning in result["warnings"] and f"!!! {warning}" in caplog.text
    assert f"[lp] WARNING: {warning}" in capsys.readouterr().out  # the summary line
    assert "teacher" not in result["timing"] and "distill" not in result["data"]  # no teacher logits computed
    assert not any(k.startswith("distill/") for k in result["metrics"]) and "ppl/ptb" in result["metrics"]
    saved = json.loads((tmp_path / "result.json").read_text())
    assert saved["distill"] == {"skipped": reason} and warning in saved["warnings"]


@pytest.mark.slow
def test_run_distills_before_saving_and_reuses_the_teacher_cache(cfg_factory, tmp_path, monkeypatch):
    from lp.run import run

    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    small = ["model=tiny_llama", "eval=quick", "eval.ppl.max_windows=2", "eval.ppl.progress=false",
             "calib=quick", "calib.split=validation", "calib.nsamples=4", "calib.seqlen=64",
             "pruner=manual", "pruner.layers=[2,3]", "patch=rotate", "patch.save=true"]
    dist = ["distill=quick", "distill.nsamples=6", "distill.nval=2", "distill.seqlen=64", "distill.batch_size=2",
            "distill.val_every=2", "distill.optimizer.lr=1e-2", "distill.progress=false"]
    free = run(cfg_factory(*small, "paths.output_dir=" + str(tmp_path / "free")))
    a = run(cfg_factory(*small, *dist, "paths.output_dir=" + str(tmp_path / "a")))
    b = run(cfg_factory(*small, *dist, "paths.output_dir=" + str(tmp_path / "b")))
    info = a["distill"]
    assert info["steps"] == 3 and [v["step"] for v in info["val"]] == [0, 2, 3]
    assert a["metrics"]["distill/val_ppl_after"] == info["val_ppl_after"]
    assert a["data"]["distill"]["teacher_cache"] == b["data"]["distill"]["teacher_cache"]
    assert len(list((tmp_path / "cache" / "teacher").iterdir())) == 1  # reused, not rebuilt
    assert a["metrics"] == b["metrics"]  # deterministic
    # the saved model holds the distilled patch, not the training-free one
    p0 = find_patches(load_pruned(free["saved_model"])[0])[0].weight
    p1 = find_patches(load_pruned(a["saved_model"])[0])[0].weight
    assert ((p1 - p0).norm() / p0.norm()).item() == pytest.approx(info["patch_rel_change"][0], rel=1e-4)
    assert free["metrics"]["ppl/wikitext2"] != a["metrics"]["ppl/wikitext2"]


@pytest.mark.real
def test_real_smollm2_suffix_student_equals_full_model_student():
    from lp.models import load_model

    dense, _ = load_model(OmegaConf.load(CONF.parent / "model" / "smollm2_135m.yaml"))
    dense = dense.float()  # fp32: the two paths differ only by summation order
    n = dense.config.num_hidden_layers
    student = copy.deepcopy(dense)
    drop_layers(student, [20, 21, 22, 23, 24])
    H = hadamard(dense.config.hidden_size)
    s = 0.8 + 0.4 * torch.rand(H.shape[0], generator=torch.Generator().manual_seed(0))
    insert_patches(student, {20: LinearPatch(patch_matrix(s, "rotate", H), 20, 25, n)})
    win = torch.randint(0, dense.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        top = dense(input_ids=win).logits.topk(50, dim=-1)
    w = find_patches(student)[0].weight
    full = D.full_student_loss(student, win, top.indices, top.values)
    (g_full,) = torch.autograd.grad(full, [w])
    suffix = D.Suffix(student)
    assert suffix.start == "model.layers.20" and len(suffix.modules) == 6
    loss = D.topk_kl(suffix.logits_at(suffix.hidden(suffix.prefix(win)), top.indices), top.values)
    (g_suf,) = torch.autograd.grad(loss, [w])
    assert full.item() > 1e-3
    torch.testing.assert_close(loss, full, rtol=1e-4, atol=1e-6)
    # fp32 summation order differs between the two paths (and between BLAS kernels and thread counts), so an
    # element-wise rtol fails on entries near 0 (seen: one entry of 331776 off by 1.25e-6, rel 0.85%); the
    # absolute tolerance is 1e-4 of the gradient's largest entry (a wrong suffix moves entries by O(max))
    scale = g_full.abs().max().item()
    assert scale > 0
    torch.testing.assert_close(g_suf, g_full, rtol=1e-3, atol=1e-4 * scale)
