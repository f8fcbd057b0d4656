"""LLM-Pruner width pruning: importance, surgery on Llama / Qwen2 (GQA) / SmolLM2, stock save -> reload."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import TINY

from lp.calib import Calibration
from lp.models import Decoder, count_params, load_model, tiny_model
from lp.pruners.base import PruneContext
from lp.pruners.llm_pruner import LLMPruner, unit_counts, unit_importance
from lp.run import run
from lp.width import geometry

QUICK = [*TINY, "calib=quick", "calib.nsamples=4", "calib.seqlen=32"]


def windows(n=4, t=24, seed=0):
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def naive_importance(model, w, layer):
    """Full-batch float64 gradient, then an explicit loop over every unit and every weight entry group."""
    m = tiny_model("llama", num_layers=4, hidden_size=32, intermediate_size=48).double()
    m.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    logits = m(input_ids=w).logits
    loss = torch.stack([torch.nn.functional.cross_entropy(lg[:-1], t[1:]) for lg, t in zip(logits, w, strict=True)]).mean()
    loss.backward()
    at = m.model.layers[layer].self_attn
    mlp = m.model.layers[layer].mlp
    s = lambda lin: (lin.weight.detach() * lin.weight.grad).abs()  # noqa: E731
    hd, heads, kv = at.head_dim, 4, 2
    groups = []
    for g in range(kv):
        total = 0.0
        for h in range(g * heads // kv, (g + 1) * heads // kv):
            total += s(at.q_proj)[h * hd:(h + 1) * hd].sum() + s(at.o_proj)[:, h * hd:(h + 1) * hd].sum()
        total += s(at.k_proj)[g * hd:(g + 1) * hd].sum() + s(at.v_proj)[g * hd:(g + 1) * hd].sum()
        groups.append(float(total))
    channels = [float(s(mlp.gate_proj)[c].sum() + s(mlp.up_proj)[c].sum() + s(mlp.down_proj)[:, c].sum())
                for c in range(mlp.gate_proj.out_features)]
    return torch.tensor(groups, dtype=torch.float64), torch.tensor(channels, dtype=torch.float64)


def test_importance_matches_naive_loop_with_micro_batches():
    model = tiny_model("llama", num_layers=4, hidden_size=32, intermediate_size=48)
    w = windows()
    imp = unit_importance(model, w, [1, 2], micro_batch=3)  # micro-batches of 3 + 1 summed in float32
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # model left as found
    for layer in (1, 2):
        groups, channels = naive_importance(model, w, layer)
        torch.testing.assert_close(imp[layer][0].double(), groups, rtol=1e-4, atol=1e-9)
        torch.testing.assert_close(imp[layer][1].double(), channels, rtol=1e-4, atol=1e-9)


def prune(model, **kw):
    w = windows()
    sel = LLMPruner(**kw).select(PruneContext(model, None, Calibration(lambda: (w, {"corpus": "test"}))))
    return sel, w


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_pruned_shapes_and_forward(arch):
    model = tiny_model(arch, num_layers=6, hidden_size=64, intermediate_size=96, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=8)
    dense = count_params(model)
    sel, w = prune(model, n=2, keep_first=1, keep_last=1)
    assert sel.removed == [] and sel.info["n"] == 2
    g_rm, c_rm = sel.info["kv_groups_removed_per_layer"], sel.info["channels_removed_per_layer"]
    sel.width.apply(model)
    for i, layer in enumerate(Decoder(model).layers):
        g = geometry(layer)
        pruned = 1 <= i <= 4
        assert (g.kv_heads, g.heads, g.intermediate) == ((4 - g_rm, 2 * (4 - g_rm), 96 - c_rm) if pruned else (4, 8, 96))
        assert g.head_dim == 8 and g.group_size == 2  # GQA ratio kept
        if arch == "qwen2":
            assert layer.self_attn.q_proj.bias.shape == (g.heads * 8,) and layer.self_attn.k_proj.bias.shape == (g.kv_heads * 8,)
    assert g_rm >= 1 and c_rm >= 1
    out = model(input_ids=w).logits
    assert out.shape == (4, 24, 259) and torch.isfinite(out).all()
    # ratio=match: the parameters of 2 whole layers (norms aside, to within one channel per pruned layer)
    layer = sum(p.numel() for p in tiny_model(arch, num_layers=1, hidden_size=64, intermediate_size=96,
                                                 num_attention_heads=8, num_key_value_heads=4,
                                                 head_dim=8).model.layers[0].parameters())
    assert abs((dense - count_params(model)) - 2 * layer) <= 4 * (3 * 64 + 1) + 2 * 2 * 64
    # generation with the KV cache works with two layer shapes
    gen = model.generate(w[:1, :5], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 8)


def test_unit_counts_keep_ratio_with_coarse_groups():
    g = geometry(tiny_model("llama", num_layers=1, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64).model.layers[0])
    assert g.kv_heads == 3 and g.params_prunable == 884736 + 2654208  # SmolLM2-135M layer
    for ratio in (0.05, 0.2083, 0.4):
        groups, channels = unit_counts(g, ratio)
        removed = groups * g.params_group + channels * g.params_channel
        assert abs(removed - ratio * g.params_prunable) <= g.params_channel / 2 and groups < 3


def test_pruner_settings_are_checked():
    with pytest.raises(ValueError, match=r"pruner.ratio=0.2 with pruner.n=5.*pruner.n=null"):
        LLMPruner(ratio=0.2, n=5)
    with pytest.raises(ValueError, match=r"pruner.ratio=1.5 must be 'match' or a number in \(0, 1\)"):
        LLMPruner(ratio=1.5, n=None)
    with pytest.raises(ValueError, match="pruner.n=5 out of range.*1 <= n <= 1"):
        LLMPruner(n=5).check(8)  # 2 prunable layers 4..5
    with pytest.raises(ValueError, match="keep_first=4 \\+ keep_last=4 leave no layer"):
        LLMPruner(keep_last=4).check(8)
    assert LLMPruner(ratio=0.25, n=None).n is None


RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
ids = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(m(input_ids=ids).logits, sys.argv[3])
print(sum(p.numel() for p in m.parameters()))
"""


@pytest.mark.parametrize("arch, keep, storage", [("llama", (1, 1), "dense_zero_padded"),
                                                 ("qwen2", (1, 1), "dense_zero_padded"),
                                                 ("qwen2", (0, 0), "compact")])
@pytest.mark.slow
def test_save_reloads_with_stock_from_pretrained(tmp_path, arch, keep, storage):
    model = tiny_model(arch, num_layers=4, hidden_size=64, intermediate_size=96)
    dense = count_params(model)
    sel, w = prune(model, n=1, keep_first=keep[0], keep_last=keep[1])
    sel.width.apply(model)
    with torch.no_grad():
        want = model(input_ids=w).logits
    sel.width.save(model, None, tmp_path / "model", {"name": "t"})
    torch.save(w, tmp_path / "ids.pt")
    out = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "model"), str(tmp_path / "ids.pt"),
                          str(tmp_path / "logits.pt")], capture_output=True, text=True, check=True)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt", weights_only=True), want, rtol=1e-5, atol=1e-5)
    saved = json.loads((tmp_path / "model" / "config.json").read_text())
    assert saved["lp_width_pruning"]["storage"] == storage and saved["lp_width_pruning"]["name"] == "t"
    assert int(out.stdout.split()[-1]) == (count_params(model) if storage == "compact" else dense)
    assert not hasattr(model.config, "lp_width_pruning")  # the in-memory config is left as it was


def test_run_llm_pruner_end_to_end(cfg_factory, tmp_path):
    res = run(cfg_factory(*QUICK, "pruner=llm_pruner", "pruner.n=2", "pruner.keep_first=1", "pruner.keep_last=1", "pruner.disk_cache=false", "patch.save=true"))
    p = res["pruning"]
    assert res["status"] == "ok" and p["method"] == "llm_pruner" and p["label"] == "LLM-Pruner"
    assert p["n"] == 2 and p["removed_layers"] == [] and p["num_layers_after"] == 8
    depth = run(cfg_factory(*QUICK, "pruner=manual", "pruner.layers=[3,4]"))["pruning"]["pruned_ratio"]
    assert p["pruned_ratio"] == pytest.approx(depth, abs=0.005)
    assert p["width"]["storage"] == "dense_zero_padded" and res["saved_model"].endswith("model")


def test_patch_with_width_pruner_is_rejected_before_loading(cfg_factory):
    with pytest.raises(ValueError, match="patch=rotate bridges removed layers, but pruner=llm_pruner prunes width"):
        run(cfg_factory(*QUICK, "pruner=llm_pruner", "pruner.n=1", "patch=rotate"))


@pytest.mark.real
def test_real_smollm2_width_pruning(cfg_factory):
    model, tok = load_model(cfg_factory("model=smollm2_135m").model)
    ids = tok("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt").input_ids[:, :64]
    w = torch.cat([ids, ids.flip(1)])
    sel = LLMPruner(n=5).select(PruneContext(model, tok, Calibration(lambda: (w, {}))))
    dense = count_params(model)
    sel.width.apply(model)
    assert sel.info["kv_groups_removed_per_layer"] == 1  # of 3 GQA groups (3 query heads each)
    g = geometry(Decoder(model).layers[10])
    assert (g.kv_heads, g.heads, g.head_dim) == (2, 6, 64)
    assert geometry(Decoder(model).layers[0]).heads == 9 and geometry(Decoder(model).layers[29]).heads == 9
    assert 1 - count_params(model) / dense == pytest.approx(5 * 3540096 / dense, abs=0.002)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=w).logits).all()


def test_width_pruning_refuses_a_family_without_separate_projections():
    from lp import families
    from lp.width import check_family

    check_family(families.get("llama"))  # the layout it edits
    with pytest.raises(ValueError, match="the baichuan family has attention projections None"):
        check_family(families.get("baichuan"))
