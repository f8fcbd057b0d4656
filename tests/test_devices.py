"""Placement (lp.devices): accelerate's offload and dispatch give the in-memory model's numbers on this CPU;
non-finite activations stop a run naming the layer; memory per stage; the GPU check's CPU form."""

import json
import math
import os
import subprocess
import sys

import conftest
import pytest
import torch
from accelerate import init_empty_weights
from conftest import DATA, REPO
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from lp import devices, validate
from lp.calib import collect
from lp.models import NonFiniteActivations, byte_tokenizer, load_model, tiny_model
from lp.pruners.base import block_selection
from lp.replay import Replay
from lp.run import run

ARCH = {"arch": "llama", "num_layers": 6, "hidden_size": 64, "seed": 3}
SMALL = [*conftest.SMALL, "progress=false"]
PLACEMENTS = {  # name -> model overrides; each one other than "default" keeps decoder weights off the compute device
    "default": {},
    "sequential": {"onload": "sequential"},  # on the CPU: layers on disk, one module onloaded at a time
    "auto_offloaded": {"device_map": "auto", "max_memory": {"cpu": "400KB"}},  # accelerate spills the rest to disk
}


def model_cfg(**extra):
    return OmegaConf.create({"name": "tiny", "tiny": ARCH, "dtype": "float32", "device": "cpu", "device_map": None,
                             "max_memory": None, "onload": None, "offload": "auto", "offload_folder": None,
                             "trust_remote_code": False, **extra})


def test_execution_device_follows_hooks_parameters_and_meta():
    plain = tiny_model(**ARCH)
    assert devices.execution_device(plain) == torch.device("cpu") and not devices.is_offloaded(plain)
    with init_empty_weights():  # a model built on meta without hooks: its patches must follow it there
        meta = AutoModelForCausalLM.from_config(plain.config)
    assert devices.execution_device(meta.model.layers[0]) == torch.device("meta")
    seq, _ = load_model(model_cfg(onload="sequential"))
    layer = seq.model.layers[2]
    assert devices.is_offloaded(seq) and layer.mlp.down_proj.weight.device.type == "meta"
    assert devices.execution_device(layer) == torch.device("cpu") and devices.input_device(seq) == torch.device("cpu")
    assert set(seq.hf_device_map.values()) == {"cpu", "disk"}
    assert all(seq.hf_device_map[f"model.layers.{i}"] == "disk" for i in range(ARCH["num_layers"]))


@pytest.mark.parametrize("placement", [p for p in PLACEMENTS if p != "default"])
def test_offloaded_placements_give_the_in_memory_logits_and_statistics(placement):
    # Same weights (bit for bit from the same safetensors), same kernels on the same CPU: the values agree
    # up to float rounding of identical operations, so a tolerance of 1e-6 is generous.
    ref, _ = load_model(model_cfg())
    got, _ = load_model(model_cfg(**PLACEMENTS[placement]))
    assert devices.is_offloaded(got)
    ids = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(got(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
    a, b = collect(ref, ids, batch_size=2), collect(got, ids, batch_size=2)
    for name in ("cos_token", "cos_channel", "abs_mean"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), rtol=1e-6, atol=1e-6)


def test_run_gives_the_same_layers_and_ppl_in_every_placement(cfg_factory):
    results = {}
    for name, extra in PLACEMENTS.items():
        over = [f"model.{k}={json.dumps(v).replace(chr(34), '')}" for k, v in extra.items()]
        results[name] = run(cfg_factory(*SMALL, "pruner=linearpatch", "pruner.n=2", "patch=rotate", *over))
    ref = results["default"]
    for name, r in results.items():
        assert r["pruning"]["removed_layers"] == ref["pruning"]["removed_layers"], name
        assert r["metrics"]["ppl/ptb"] == pytest.approx(ref["metrics"]["ppl/ptb"], rel=1e-6), name
        assert set(r["memory"]) == set(r["timing"]) - {"total"}  # every stage has its peak memory
        assert all(m["rss_peak_mb"] > 0 for m in r["memory"].values())
    assert "device_map" not in ref["model"]
    assert results["sequential"]["model"]["device_map"]["model.layers.0"] == "disk"
    assert "disk" in results["auto_offloaded"]["model"]["device_map"].values()


@pytest.mark.parametrize("extra, message", [
    ({"onload": "layerwise"}, "model.onload='layerwise'; choose one of"),
    ({"offload": "gpu"}, "model.offload='gpu'; choose one of"),
    ({"onload": "sequential", "device_map": "auto"}, "set one of them"),
    ({"max_memory": {"cpu": "1GB"}}, "model.max_memory is read only with model.device_map=auto"),
])
def test_bad_placement_is_an_early_error(cfg_factory, extra, message):
    over = [f"model.{k}={json.dumps(v).replace(chr(34), '')}" for k, v in extra.items()]
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate.settings(cfg_factory("model=tiny_llama", *over))


# --------------------------------------------------------------------------- non-finite activations
def nan_model(layer: int = 1):
    model = tiny_model(**ARCH)
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[0, 0] = float("nan")
    return model


def test_calibration_and_replay_stop_at_the_first_layer_with_nan():
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(NonFiniteActivations, match=r"decoder layer 1 produced NaN/inf in float32"):
        collect(nan_model(1), ids, batch_size=2)
    rp = Replay(nan_model(1), ids, batch_size=2)
    h = rp.embed()
    rp.advance(h, 0, h)  # layer 0 is fine
    with pytest.raises(NonFiniteActivations, match="decoder layer 1"):
        rp.advance(h, 1, h)


def test_non_finite_block_scores_are_an_error_not_a_ranking():
    with pytest.raises(ValueError, match="block scores are not finite"):
        block_selection("shortgpt", torch.tensor([float("nan")] * 4, dtype=torch.float64), 2, "cos")
    with pytest.raises(ValueError, match="block scores are not finite"):
        block_selection("shortgpt", torch.tensor([0.1, float("inf"), 0.3], dtype=torch.float64), 2, "cos")
    ok = block_selection("shortgpt", torch.tensor([float("nan"), 0.2, 0.9, float("nan")], dtype=torch.float64), 2, "cos")
    assert ok.removed == [2, 3]  # NaN still means "not a candidate" (the reference variant's first/last)


@pytest.mark.slow
def test_a_checkpoint_with_one_nan_weight_ends_with_exit_2_naming_layer_1(tmp_path):
    folder = tmp_path / "nan_model"
    nan_model(1).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    cmd = [sys.executable, "run.py", "model=llama2_7b", f"model.pretrained={folder}", "model.dtype=float32",
           "model.device=cpu", "pruner=shortgpt", "pruner.n=2", *SMALL[1:], f"hydra.run.dir={tmp_path / 'out'}",
           "runtime.threads=1"]
    env = {**os.environ, "LP_DATA_DIR": str(DATA), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "decoder layer 1 produced NaN/inf in float32" in errors[0], errors
    assert "IndexError" not in proc.stderr


# --------------------------------------------------------------------------- make gpu-check, CPU form
@pytest.mark.slow
def test_gpu_check_script_runs_on_cpu_with_the_tiny_model(tmp_path, monkeypatch):
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    out = tmp_path / "gpu_check.json"
    small = ["calib.corpus=ptb", "calib.split=test", "calib.nsamples=4", "calib.seqlen=64", "calib.batch_size=2",
             "eval.ppl.datasets=[ptb]", "eval.ppl.seqlen=64", "eval.ppl.max_windows=4", "distill.nsamples=8",
             "distill.seqlen=64", "distill.nval=2", "distill.val_every=4"]
    code = gpu_check.main(["--model", "tiny_llama", "--device", "cpu", "--qa-tasks", "piqa", "--qa-limit", "4",
                           "--threads", "1", "--out", str(out), "--set", *small])
    report = json.loads(out.read_text())
    assert code == 0 and report["ok"], [r for rows in report["checks"].values() for r in rows if not r["ok"]]
    seq = report["runs"]["sequential"]
    assert seq["model"]["device_map"]["model.layers.0"] == "disk"
    assert set(seq["heldout_nll"]) == set(gpu_check.KINDS)  # every kind fitted and verified in each run
    assert all(report["saved_and_reloaded"].values())
    assert {"patch", "distill", "eval_ppl", "eval_qa", "save"} <= set(seq["memory"])
    assert all(math.isfinite(r["metrics"]["ppl/ptb"]) for r in report["runs"].values())


@pytest.mark.parametrize("pruner", ["taylor", "llm_pruner"])
def test_gradient_pruners_refuse_offloaded_layers_before_loading(cfg_factory, pruner, monkeypatch):
    monkeypatch.setattr("lp.models.load_model", lambda *a, **k: pytest.fail("loaded the model"))
    with pytest.raises(ValueError, match=f"pruner={pruner} needs gradients of the weights"):
        run(cfg_factory(*SMALL, f"pruner={pruner}", "pruner.n=1", "model.onload=sequential"))
