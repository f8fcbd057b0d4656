"""Saving pruned models (`lp.export`): every layout reloads as the same model in a FRESH process, the
way a user without lp would load it; a non-foldable folder refuses a plain load."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file
from test_patch import IDS, D, random_patches

from lp import load_pruned
from lp.export import fold_refusal, save_pruned, scalar_of
from lp.models import byte_tokenizer, drop_layers, tiny_model
from lp.patch import LinearPatch, find_patches, insert_patches, runs_of, strip_patches

L = 8
CUTS = {"middle": [3, 4], "start": [0, 1], "end": [6, 7], "three_cuts": [0, 3, 4, 7]}
KINDS = ("none", "scalar", "diag", "rotate", "lstsq")


def make_patch(kind, a, b, seed):
    """A patch of each kind's *shape*: s*I, diag(s), symmetric H diag(s) H^T-like, general D x D."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scalar":
        w = (1.3 + 0.2 * seed) * torch.eye(D)
    elif kind == "diag":
        w = torch.diag(1 + 0.3 * torch.rand(D, generator=g))
    else:
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
        w = (q * (1 + 0.3 * torch.rand(D, generator=g))) @ q.T
        if kind == "lstsq":  # not symmetric
            w = w + 0.1 * torch.randn(D, D, generator=g) / D ** 0.5
    return LinearPatch(w, a, b, L, kind)


def pruned(arch, removed, kind, dtype=torch.float32, **over):
    model = drop_layers(tiny_model(arch, num_layers=L, hidden_size=D, **over).to(dtype), removed)
    if kind != "none":
        insert_patches(model, {a: make_patch(kind, a, b, i) for i, (a, b) in enumerate(runs_of(removed))})
    return model


# One script, one fresh interpreter for all folders: `lp` is made unimportable first.
LOADER = textwrap.dedent("""
    import json, sys
    sys.modules["lp"] = None  # lp must not be needed (importing it now raises ImportError)
    try:
        import lp  # noqa
        raise SystemExit("lp is importable")
    except ImportError:
        pass
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM
    jobs, ids, out = json.loads(sys.argv[1]), torch.load(sys.argv[2], weights_only=True), sys.argv[3]
    report = {}
    for name, (path, how) in jobs.items():
        try:
            model = AutoModelForCausalLM.from_pretrained(path, **({"trust_remote_code": True} if how == "remote" else {}))
            with torch.no_grad():  # logits, and greedy generation with the KV cache
                gen = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
                save_file({"logits": model(input_ids=ids).logits.contiguous(), "generated": gen.contiguous()},
                          f"{out}/{name}.safetensors")
            report[name] = {"ok": True, "class": type(model).__name__, "dtype": str(next(model.parameters()).dtype)}
        except Exception as e:
            report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    with open(f"{out}/report.json", "w") as f:
        json.dump(report, f)
""")


def load_in_fresh_process(tmp_path, jobs: dict) -> dict:
    """{name: (folder, "stock" | "remote")} -> {name: report}; logits in tmp_path/fresh/<name>.safetensors."""
    out = tmp_path / "fresh"
    out.mkdir()
    torch.save(IDS, out / "ids.pt")
    env = {**os.environ, "PYTHONPATH": "", "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    jobs = {k: (str(p), how) for k, (p, how) in jobs.items()}
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(jobs), str(out / "ids.pt"), str(out)],
                          cwd=out, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "report.json").read_text())


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


# --------------------------------------------------------------------------- fresh-process reload
@pytest.mark.parametrize("arch,kinds", [("llama", KINDS), ("qwen2", ("none", "scalar", "rotate")),
                                        ("mistral", ("scalar", "diag"))])
def test_every_kind_and_cut_reloads_in_a_fresh_process_without_lp(tmp_path, arch, kinds):
    models, jobs = {}, {}
    for kind in kinds:
        for where, removed in CUTS.items():
            if where == "three_cuts" and kind not in ("scalar", "rotate"):
                continue
            name = f"{kind}_{where}"
            models[name] = pruned(arch, removed, kind)
            path = save_pruned(models[name], byte_tokenizer(), tmp_path / name)
            mode = json.loads((path / "lp_patch.json").read_text())["mode"]
            assert mode == {"none": "plain", "scalar": "folded"}.get(kind, "custom"), (name, mode)
            assert find_patches(models[name]) or kind == "none", "saving must leave the model patched"
            jobs[name] = (path, "remote" if mode == "custom" else "stock")
            if mode == "custom":
                jobs[f"{name}_plain"] = (path, "stock")
    report = load_in_fresh_process(tmp_path, jobs)
    for name, model in models.items():
        assert report[name]["ok"], (name, report[name])
        fresh = load_file(str(tmp_path / "fresh" / f"{name}.safetensors"))
        got, want = fresh["logits"], logits(model)
        with torch.no_grad():
            gen = model.generate(IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(fresh["generated"], gen), name
        if name.startswith("scalar"):  # folded: equal up to the RMSNorm eps (see test_fold_deviation_is_the_norm_eps)
            assert report[name]["class"] == model.__class__.__name__
            torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())
        else:
            assert torch.equal(got, want), name
        if f"{name}_plain" in report:  # the custom layout never loads silently as the base architecture
            assert not report[f"{name}_plain"]["ok"]
            assert "trust_remote_code=True" in report[f"{name}_plain"]["error"], report[f"{name}_plain"]
    custom = [n for n in models if n.split("_")[0] not in ("none", "scalar")]
    assert all(report[n]["class"] == "LpPatchedForCausalLM" for n in custom)


def test_custom_layout_folder_and_config(tmp_path):
    model = pruned("qwen2", CUTS["three_cuts"], "rotate")
    path = save_pruned(model, byte_tokenizer(), tmp_path / "m", {"note": "test"})
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] == "lp_patched_qwen2" and cfg["architectures"] == ["LpPatchedForCausalLM"]
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "modeling_lp.LpPatchedForCausalLM"
    assert cfg["num_hidden_layers"] == 4 and len(cfg["layer_types"]) == 4  # per-layer lists cut too
    assert [c["module"] for c in cfg["lp_patches"]] == ["model.layers.0", "model.layers.2", "model.norm"]
    modeling = (path / "modeling_lp.py").read_text()
    assert 'BASE_MODEL_TYPE = \'qwen2\'' in modeling and "import lp" not in modeling and "from lp" not in modeling
    meta = json.loads((path / "lp_patch.json").read_text())
    assert meta["removed_layers"] == [0, 3, 4, 7] and meta["num_layers_dense"] == 8 and meta["meta"] == {"note": "test"}
    assert [(c["start"], c["end"]) for c in meta["cuts"]] == [(0, 1), (3, 5), (7, 8)]
    st = load_file(str(path / "model.safetensors"))
    assert st["model.norm.lp_patch.weight"].dtype == torch.float32
    assert not any(".inner." in k for k in st), "base weights keep the base architecture's names"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_pruned_gives_lp_model_with_identical_logits(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    # load the dense model in `dtype` as load_model does for real checkpoints (`.to(bf16)` would also
    # cast the rotary inv_freq buffer, which from_pretrained keeps in fp32)
    tiny_model("llama", num_layers=L, hidden_size=D).save_pretrained(tmp_path / "dense")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=dtype)
    drop_layers(model, [0, 3, 4, 7])
    insert_patches(model, random_patches([0, 3, 4, 7], L))
    path = save_pruned(model, byte_tokenizer(), tmp_path / "m")
    back, tok = load_pruned(path)
    assert torch.equal(logits(back), logits(model))
    assert next(back.parameters()).dtype == dtype and tok is not None
    assert [p.weight.dtype for p in find_patches(back)] == [torch.float32] * 3
    remote = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # default dtype: the saved one
    assert next(remote.parameters()).dtype == dtype and torch.equal(logits(remote), logits(model))


# --------------------------------------------------------------------------- folding
def test_fold_deviation_is_the_norm_eps(tmp_path):
    """With eps = 0 the fold is exact up to float rounding; with eps > 0 the deviation is eps-sized."""
    from transformers import AutoModelForCausalLM

    devs = {}
    for eps in (0.0, 1e-6):
        model = pruned("llama", CUTS["three_cuts"], "scalar", rms_norm_eps=eps)
        path = save_pruned(model, None, tmp_path / f"eps{eps}")
        want = logits(model)
        devs[eps] = ((logits(AutoModelForCausalLM.from_pretrained(path)) - want).abs().max() / want.abs().max()).item()
    assert devs[0.0] < 2e-6, devs
    assert devs[1e-6] < 2e-4, devs


def test_fold_is_refused_where_the_argument_fails():
    dense = tiny_model("llama", num_layers=L, hidden_size=D)
    stripped = lambda m: (m, strip_patches(m))  # noqa: E731
    m, ps = stripped(pruned("llama", [3, 4], "scalar"))
    assert fold_refusal(m, ps) is None and scalar_of(ps[3]) == pytest.approx(1.3)
    neg = {3: LinearPatch(-2 * torch.eye(D), 3, 5, L, "scalar")}
    assert "finite s > 0" in fold_refusal(drop_layers(dense, [3, 4]), neg)
    m, ps = stripped(pruned("llama", [3, 4], "diag"))
    assert "not a uniform scalar" in fold_refusal(m, ps)
    m, ps = stripped(pruned("gemma3_text", [3, 4], "scalar"))
    assert "no sandwich/post norms" in fold_refusal(m, ps)


def test_scalar_patch_on_gemma_saves_as_custom_class(tmp_path):
    model = pruned("gemma3_text", [3, 4], "scalar")
    path = save_pruned(model, None, tmp_path / "m")
    meta = json.loads((path / "lp_patch.json").read_text())
    assert meta["mode"] == "custom" and "post_feedforward_layernorm" in meta["fold_refused"]
    assert torch.equal(logits(load_pruned(path)[0]), logits(model))


def test_a_fold_that_fails_verification_falls_back_to_custom(tmp_path, monkeypatch):
    import lp.export as export_mod

    model = pruned("llama", [3, 4], "scalar")
    real = export_mod.folded_state_dict

    def wrong(m, ps):  # a fold that forgets a factor: verification must catch it
        sd, rec = real(m, ps)
        sd["model.layers.3.mlp.down_proj.weight"] = sd["model.layers.3.mlp.down_proj.weight"] * 1.3
        return sd, rec

    monkeypatch.setattr(export_mod, "folded_state_dict", wrong)
    path = save_pruned(model, None, tmp_path / "m")
    meta = json.loads((path / "lp_patch.json").read_text())
    assert meta["mode"] == "custom" and meta["fold_refused"].startswith("fold failed verification")
    assert torch.equal(logits(load_pruned(path)[0]), logits(model))


# --------------------------------------------------------------------------- atomic save
def test_save_pruned_replaces_only_a_complete_save(tmp_path, monkeypatch):
    import lp.export as export_mod

    model = pruned("llama", [3, 4], "rotate")
    first = save_pruned(model, None, tmp_path / "m", {"run": 1})
    save_pruned(model, None, first, {"run": 2})  # an earlier save is replaced
    assert json.loads((first / "lp_patch.json").read_text())["meta"] == {"run": 2}

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "_write_custom_config", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, first, {"run": 3})
    assert json.loads((first / "lp_patch.json").read_text())["meta"] == {"run": 2}  # the old save is intact
    with pytest.raises(OSError, match="disk full"):
        save_pruned(model, None, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # nothing half-written, no temp folder left
    assert find_patches(model), "a failed save leaves the in-memory model patched"
    monkeypatch.undo()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="is not a save_pruned folder"):
        save_pruned(model, None, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_a_save_that_does_not_reproduce_the_model_is_an_error(tmp_path, monkeypatch):
    import lp.export as export_mod

    model = pruned("llama", [3, 4], "rotate")
    real = export_mod._custom_state_dict

    def drops_the_patch(m, ps, *rest):
        sd, rec = real(m, ps, *rest)
        sd["model.layers.3.lp_patch.weight"] = torch.eye(D)
        return sd, rec

    monkeypatch.setattr(export_mod, "_custom_state_dict", drops_the_patch)
    with pytest.raises(RuntimeError, match="does not reproduce the in-memory model"):
        save_pruned(model, None, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not list(tmp_path.iterdir())


# --------------------------------------------------------------------------- run(cfg): card + sample
SAVED = [*TINY, "calib=quick", "calib.split=validation", "calib.nsamples=4", "calib.seqlen=64", "pruner=manual",
         "pruner.layers=[2,3]"]


@pytest.mark.parametrize("patch,mode", [("none", "plain"), ("scalar", "folded"), ("rotate", "custom")])
def test_run_saves_a_carded_model_with_metrics_and_a_greedy_sample(cfg_factory, tmp_path, monkeypatch, patch, mode):
    from lp.run import run

    monkeypatch.setenv("LP_CACHE_DIR", str(tmp_path / "cache"))
    r = run(cfg_factory(*SAVED, f"patch={patch}", "patch.save=true", "eval.generate.max_new_tokens=5"))
    assert r["export"] == {"mode": mode, "fold_refused": None if mode != "custom" else
                           "the rotate patch at cut [2, 4) is not a uniform scalar s*I"}
    gen = r["generation"]
    assert gen["prompt"] == "The capital of France is" and gen["new_tokens"] <= 5 and gen["max_new_tokens"] == 5
    model, tok = load_pruned(r["saved_model"])  # the saved model generates the same greedy text
    ids = tok(gen["prompt"], return_tensors="pt")
    out = model.generate(**ids, do_sample=False, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    assert tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True) == gen["completion"]
    card = (tmp_path / "model" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and f"- patch-{patch}" in card
    assert f"| ppl/wikitext2 | {r['metrics']['ppl/wikitext2']:.4g} |" in card  # written after evaluation
    assert "[2, 3]" in card and r["git_commit"] in card and gen["completion"] in card
    assert ("trust_remote_code=True" in card) == (mode == "custom")


def test_bad_generate_settings_fail_before_any_work(cfg_factory):
    from lp.run import run

    with pytest.raises(ValueError, match="eval.generate.max_new_tokens=0 must be a positive integer"):
        run(cfg_factory("model=tiny_llama", "eval=quick", "eval.generate.max_new_tokens=0"))
    with pytest.raises(ValueError, match="eval.generate.prompt=''"):
        run(cfg_factory("model=tiny_llama", "eval=quick", "eval.generate.prompt=''"))
