"""The pipeline: validate -> load -> select layers -> fit patches (dense model; teacher logits) -> drop + insert
patches -> (distill the patches) -> (save) -> evaluate -> result.json.

`run(cfg) -> dict` is a plain function of a composed config (see `conf/config.yaml`); `run.py`
at the repository root is only the `@hydra.main` shim. Every artefact goes into
`cfg.paths.output_dir` (the Hydra job directory); `result.json` is written atomically, also
when the run fails (then with `status: "failed"` and the error), so a reader never sees half a file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lp import (
    batching,
    cache,
    calib,
    candidates,
    card,
    data,
    devices,
    distill,
    families,
    gpus,
    hadamard,
    methods,
    models,
    threads,
    validate,
    verify,
    width,
)
from lp.bookkeeping import is_bookkeeping
from lp.evaluate import generate, lm_eval_tasks
from lp.evaluate.lm_eval_tasks import paper_scores, retained_performance
from lp.evaluate.ppl import perplexity, window_nll
from lp.patch import insert_patches
from lp.pruners import PruneContext
from lp.record import environment, hydra_runtime, write_json_atomic
from lp.report.messages import summary_line
from lp.stages import Stages
from lp.tracking import finish_tracker, start_tracker

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- pipeline
def run(cfg: DictConfig) -> dict:
    """Prune, patch, (distill), evaluate and log one configuration. Returns the result dict."""
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    choices, overrides = hydra_runtime()
    choices.setdefault("model", cfg.model.name)
    result = {
        "status": "running", "error": None, "name": None, "choices": choices, "overrides": overrides,
        "config": OmegaConf.to_container(cfg, resolve=True), **environment(),
    }
    trackers = []  # the tracker `recipe` starts once the run has a name; finished here, also on failure
    try:
        with cache.using(cfg.paths.get("cache_dir"), cfg.paths.get("cache_locking", True)):
            recipe(cfg, out, stages, result, trackers)
        result["status"] = "ok"
    except BaseException as e:
        result.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        result["timing"] = stages.total()
        result["memory"] = stages.memory
        write_json_atomic(out / "result.json", result)
        for tracker in trackers:
            finish_tracker(tracker, result)
    print(summary_line(result, out))
    return result


def recipe(cfg: DictConfig, out: Path, stages: Stages, result: dict, trackers: list) -> None:
    """The stages in order. Each stage function returns its part of the result; only this function
    writes into `result`, as each part becomes known (so a failed run's result.json holds every part
    that finished)."""
    result["runtime"], warnings = threads.apply(cfg.runtime.threads)  # first: before any torch work
    result["runtime"]["gpu"], gpu_warnings = gpus.apply(cfg.model)  # parallel local jobs: one GPU each
    result.setdefault("warnings", []).extend(warnings + gpu_warnings)
    pruner, num_layers = preflight(cfg)
    torch.manual_seed(cfg.seed)
    result["name"] = run_name(cfg, pruner, result["overrides"])
    tracker = start_tracker(cfg, out, result, job_type=pruner.name)  # hand on to stages that log curves
    trackers.append(tracker)

    with stages("load"):
        model, tokenizer = load(cfg.model, pruner)
    result["model"] = model_info(cfg, model)
    params_dense = models.count_params(model)
    dense_qa = dense_qa_scores(cfg, pruner, model, tokenizer, stages)

    ctx = prune_context(cfg, model, tokenizer)
    with stages("select"):
        sel = pruner.select(ctx)
    heldout = verify.heldout(cfg, model, tokenizer, ctx.batch_size) if sel.removed else None  # lp.verify
    with stages("check_selection"):
        sel, sel_warnings = verify.check_selection(heldout, sel, getattr(pruner, "rerank", 0))
    patches, patches_info, patch_warnings = make_patches(cfg, ctx, sel.removed, heldout, stages)
    result["warnings"].extend(sel_warnings + patch_warnings)
    result["data"] = {"calibration": ctx.calibration.provenance,  # None only if nothing needed calibration
                      "calibration_batch_size": ctx.batch_size}  # resolved (calib.batch_size=auto: lp.batching)
    teacher, skipped = None, distill.skipped(cfg.distill, cfg.patch.kind, patches)  # auto chose no patch anywhere
    if skipped:
        result["distill"], warning = skipped
        result["warnings"].append(warning)
    elif cfg.distill.name != "none":  # the teacher is the dense model: cache its top-k logits before the drop
        with stages("teacher"):
            teacher, result["data"]["distill"] = distill.prepare_teacher(cfg, model, tokenizer)
    with stages("drop"):
        models.drop_layers(model, sel.removed)
        if sel.width is not None:  # width pruners: heads/channels instead of layers
            sel.width.apply(model)
    params_patch, params_folded = attach_patches(model, patches)
    result["pruning"] = pruning_info(pruner, sel, num_layers, params_dense, models.count_params(model) - params_patch,
                                     params_patch, params_folded)
    if (sim := calib.similarity(ctx)) is not None:  # pairwise cosines for the dashboard's heatmap
        result["pruning"]["similarity"] = sim
    result["patch"] = {"kind": cfg.patch.kind, **(patches_info or {})}
    if teacher is not None:
        with stages("distill"):
            result["distill"] = distill.distill(model, teacher, cfg.distill, tracker=tracker)
    if cfg.patch.get("save", False):
        with stages("save"):
            result["saved_model"], result["export"] = card.save_with_card(model, tokenizer, out / "model", result, sel.width)

    metrics = result["metrics"] = distill.metrics(result["distill"]) if teacher is not None else {}
    if cfg.eval.get("ppl"):
        with stages("eval_ppl"):
            m, provenance = eval_ppl(cfg, model, tokenizer)
        metrics.update(m)
        result["data"].update(provenance)
    for section in ("qa", "mmlu"):
        if cfg.eval.get(section):
            with stages(f"eval_{section}"):
                m, result[f"lm_eval_{section}"] = eval_lm(cfg.eval[section], model, tokenizer, cfg.data.root)
            metrics.update(m)
    if cfg.eval.get("qa") and (dense_qa or cfg.eval.qa.dense_reference):
        result["qa_dense"] = dense_qa
        metrics["qa/rp"] = qa_retained(metrics, dense_qa, list(cfg.eval.qa.tasks))
    if generate.generation_wanted(gen := cfg.eval.get("generate")):
        with stages("generate"):
            result["generation"] = generate.greedy_sample(model, tokenizer, gen.prompt, gen.max_new_tokens)
    if result.get("export"):  # the card again, now with the metrics and the sample
        card.write_card(result["saved_model"], result)


# ----------------------------------------------------------------------------- stages
def preflight(cfg: DictConfig) -> tuple:
    """Every check of a run that needs no weights, in order: the settings (`validate.settings`), the
    pruner's own constructor checks, the model's config (`check_model`), the dense QA reference. Raises
    the one-line error; loads and writes nothing. Returns `(pruner, dense layer count)`."""
    validate.settings(cfg, hydra_runtime()[0])
    pruner = build(cfg.pruner)
    num_layers = check_model(cfg, pruner)
    if cfg.eval.get("qa") and cfg.eval.qa.dense_reference:
        dense_reference(cfg, list(cfg.eval.qa.tasks))
    return pruner, num_layers


# Settings that are parts of a run name already (`model.name`, `n<removed>`): not repeated after them.
IN_RUN_NAME = ("model.name", "pruner.n")


def run_name(cfg: DictConfig, pruner, overrides: list[str] = ()) -> str:
    """`model/pruner/patch/n<removed>`, e.g. `smollm2_135m/shortgpt/rotate/n4`, then the values of
    non-group settings set on the command line or by the sweep (an ablation such as
    `calib.nsamples=4 seed=1` gives `.../n4/nsamples=4,seed=1`); bookkeeping keys
    (`lp.bookkeeping`) and :data:`IN_RUN_NAME` left out."""
    parts = [str(x) for x in (cfg.model.name, pruner.name, cfg.patch.kind, f"n{pruner.n}")]
    keys = [(o.lstrip("+~"), o.lstrip("+~").partition("=")[0]) for o in overrides]
    extra = [o for o, k in keys if ("." in k or k == "seed") and not is_bookkeeping(k) and k not in IN_RUN_NAME]
    if extra:
        parts.append(",".join(f"{k.rsplit('.', 1)[-1]}={_short(v)}" for k, _, v in (o.partition("=") for o in extra)))
    return "/".join(parts)


def _short(value: str) -> str:
    """A path-valued override by its last component (`model.pretrained=/data/llama` -> `llama`), so run names
    (and the table rows built from them) never hold a whole folder path."""
    return Path(value.rstrip("/")).name or value if "/" in value else value


def check_model(cfg: DictConfig, pruner) -> int:
    """Every check that needs the model's config but no weights: its family (`lp.families`; an unknown one is
    one line), the layout width surgery edits, then `validate.against_model`. Returns the dense layer count."""
    mconf = models.load_config(cfg.model)
    family = families.get(getattr(mconf, "model_type", None))
    if methods.prunes_width(pruner.name):
        width.check_family(family)
    validate.against_model(cfg, pruner, mconf.num_hidden_layers, getattr(mconf, "max_position_embeddings", None),
                           getattr(mconf, "hidden_size", None))
    return mconf.num_hidden_layers


def load(mcfg: DictConfig, pruner) -> tuple:
    """`models.load_model`, refusing (before and after loading) offloaded layers for pruners that need
    gradients of the weights (`needs_weight_grads`: taylor, llm_pruner)."""
    grads = getattr(pruner, "needs_weight_grads", False)
    if grads and mcfg.get("onload"):
        raise ValueError(f"pruner={pruner.name} needs gradients of the weights, which model.onload={mcfg.onload} "
                         "keeps off the device; use the default placement or model.device_map=auto without offload")
    model, tokenizer = models.load_model(mcfg)
    if grads and devices.is_offloaded(model):
        raise ValueError(f"pruner={pruner.name} needs gradients of the weights, but model.device_map="
                         f"{mcfg.device_map} offloaded some layers to host memory or disk; give the GPUs more "
                         "model.max_memory or use more GPUs")
    return model, tokenizer


def model_info(cfg: DictConfig, model) -> dict:
    """`result["model"]`: name, dense layer count, hidden size, dtype and device of the loaded model."""
    dec = models.Decoder(model)
    device = devices.input_device(model)
    info = {"name": cfg.model.name, "num_layers": dec.num_layers, "hidden_size": dec.hidden_size,
            "dtype": str(devices.model_dtype(model)).removeprefix("torch."), "device": str(device)}
    device_map = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    if device_map and device_map != {"": str(device)} and device_map != {"": str(device.index)}:
        info["device_map"] = device_map  # split or offloaded: where each module's weights live
    return info


def dense_qa_scores(cfg: DictConfig, pruner, model, tokenizer, stages: Stages) -> dict[str, float] | None:
    """Dense per-task QA scores for RP: read from `eval.qa.dense_reference`, or (`eval.qa.eval_dense`)
    measured on the dense model before pruning; None when there is no QA or no dense reference."""
    if not cfg.eval.get("qa"):
        return None
    tasks = list(cfg.eval.qa.tasks)
    if cfg.eval.qa.dense_reference:
        return dense_reference(cfg, tasks)
    if cfg.eval.qa.eval_dense and pruner.name != "none":
        with stages("eval_qa_dense"):
            m, _ = eval_lm(cfg.eval.qa, model, tokenizer, cfg.data.root)
        return paper_scores(m, tasks)
    return None


def prune_context(cfg: DictConfig, model, tokenizer) -> PruneContext:
    """What the pruner (and the patch statistics) may read; calibration windows are built lazily (at once
    for `calib.batch_size=auto` on a GPU, whose probe is one calibration pass over the first windows)."""
    source = calib.Calibration(lambda: calibration(cfg, tokenizer))
    batch_size = batching.resolve(cfg.calib.batch_size, devices.input_device(model),
                                  lambda bs: calib.collect(model, source.windows[:bs], bs), cfg.calib.nsamples,
                                  "calibration")
    return PruneContext(model, tokenizer, source, cache_key=stats_key(cfg), batch_size=batch_size,
                        basis=hadamard.Basis.of(cfg.patch), progress=bool(cfg.get("progress", True)))


def make_patches(cfg: DictConfig, ctx: PruneContext, removed: list[int], heldout, stages: Stages) -> tuple:
    """`(patches, info, warnings)`: one LinearPatch per removed run of the configured kind (or auto's
    choice per cut), verified on `heldout` if given. Built on the dense model, before the drop: the
    candidates are fitted (`lp.candidates`), verified (`lp.verify.verify_patches`), then shipped."""
    if not removed or (cfg.patch.kind == "none" and heldout is None):
        return {}, None, []
    with stages("patch"):
        cands = candidates.fit_candidates(ctx, removed, cfg.patch)
        record, warnings = verify.verify_patches(heldout, cands) if heldout is not None else (None, [])
        patches, info = candidates.ship(cands, record, warnings)
    return patches, info, warnings


def attach_patches(model, patches: dict) -> tuple[int, int]:
    """Insert `patches` into the pruned `model`. Returns `(their parameter count, how many of those fold
    exactly into the kept weights by construction)`: mlp-site patches (lstsq_mlp, rotate_mlp) that
    `lp.fold.mlp_fold_refusal` accepts become the `down_proj` of the layer before their cut in any saved
    checkpoint, so they add no parameters there. (A scalar patch may fold too, but only within the
    export's tolerance, decided at save time: `result["export"]["mode"]`.)"""
    if not patches:
        return 0, 0
    from lp.fold import mlp_fold_refusal

    numel = {a: sum(p.numel() for p in patch.parameters()) for a, patch in patches.items()}
    folded = sum(numel[a] for a, p in patches.items() if p.site == "mlp" and mlp_fold_refusal(model, p, patches) is None)
    insert_patches(model, patches)
    return sum(numel.values()), folded


def pruning_info(pruner, sel, num_layers: int, params_dense: int, params_pruned: int, params_patch: int,
                 params_folded: int = 0) -> dict:
    """`result["pruning"]`: what was removed and the parameter accounting: `params_patch` the patches'
    parameters in memory, `params_patch_folded` those of them a save folds into the kept weights
    (`attach_patches`); `pruned_ratio_with_patch` counts the patch parameters that stay separate."""
    return {
        "method": pruner.name, "label": methods.label(pruner.name), "n": len(sel.removed), "removed_layers": sel.removed,
        "num_layers_after": num_layers - len(sel.removed), "params_dense": params_dense,
        "params_pruned": params_pruned, "params_patch": params_patch, "params_patch_folded": params_folded,
        "pruned_ratio": 1 - params_pruned / params_dense,
        "pruned_ratio_with_patch": 1 - (params_pruned + params_patch - params_folded) / params_dense, **sel.info,
    }


def qa_retained(metrics: dict, dense_qa: dict | None, tasks: list[str]) -> float | None:
    """RP (%) of the pruned QA scores in `metrics` against the dense ones; None (logged) where undefined."""
    try:
        return retained_performance(paper_scores(metrics, tasks), dense_qa)
    except ValueError as e:  # e.g. a dense score of 0: RP undefined, the other metrics stand
        log.warning("RP not computed: %s", e)
        return None


def build(node: DictConfig):
    """`instantiate(node)`; a constructor's ValueError/TypeError (bad setting) is re-raised as is, so
    that it reads as the one-line bad-input error instead of Hydra's InstantiationException."""
    try:
        return instantiate(node)
    except InstantiationException as e:
        if isinstance(e.__cause__, (ValueError, TypeError)):
            raise e.__cause__ from None
        raise


def calibration(cfg: DictConfig, tokenizer) -> tuple[torch.Tensor, dict]:
    """Calibration windows `[nsamples, seqlen]` from `cfg.calib`, with provenance."""
    c = cfg.calib
    windows, prov = data.calibration_set(tokenizer, c.corpus, c.split, c.nsamples, c.seqlen, c.seed, c.holdout,
                                         cfg.data.root, cfg.data.source, c.get("nval") or 0)
    return windows, {**prov, "nsamples": c.nsamples, "seqlen": c.seqlen, "seed": c.seed, "holdout": c.holdout}


def stats_key(cfg: DictConfig) -> dict:
    """Identity of everything calibration statistics depend on (for on-disk caches; not `calib.nval`)."""
    calib = {k: v for k, v in OmegaConf.to_container(cfg.calib, resolve=True).items() if k != "nval"}
    if data.corpus(cfg.calib.corpus).documents:  # entries from before c4 used the document sampler never match
        calib["sampler"] = data.DOCUMENT_PROTOCOL
    return {"model": OmegaConf.to_container(cfg.model, resolve=True), "data_source": cfg.data.source, "calib": calib}


def eval_ppl(cfg: DictConfig, model, tokenizer) -> tuple[dict, dict]:
    """`(metrics, provenance)`: `ppl/<dataset>` for every `eval.ppl.datasets` entry, and where its
    windows came from (for `result["data"]`)."""
    e = cfg.eval.ppl
    metrics, provenance = {}, {}
    loss_dtype = e.get("loss_dtype", "float32")
    for name, split in data.ppl_sets(e.datasets, e.split):
        windows, prov = data.eval_windows(tokenizer, name, split, e.seqlen, cfg.data.root, cfg.data.source,
                                          e.max_windows)
        bs = batching.resolve(e.batch_size, devices.input_device(model),
                              lambda b, w=windows: window_nll(model, w[:b], b, progress=False), len(windows), f"ppl {name}")
        metrics[f"ppl/{name}"] = perplexity(model, windows, bs, desc=f"ppl {name}", progress=e.progress,
                                            loss_dtype=loss_dtype)
        provenance[f"ppl/{name}"] = {**prov, "windows": len(windows), "seqlen": e.seqlen, "loss_dtype": loss_dtype,
                                     "batch_size": bs}
    return metrics, provenance


def eval_lm(section: DictConfig, model, tokenizer, data_root) -> tuple[dict, dict]:
    """lm-eval tasks of one `eval.qa` / `eval.mmlu` section on the in-memory model."""
    return lm_eval_tasks.evaluate_tasks(
        model, tokenizer, list(section.tasks), data_dir=data_root, limit=section.limit,
        batch_size=section.batch_size, num_fewshot=section.num_fewshot, progress=section.get("progress", True))


def dense_reference(cfg: DictConfig, tasks: list[str]) -> dict[str, float]:
    """Dense per-task scores from `eval.qa.dense_reference` (a dense run's result.json), checked to
    come from the same model, tasks and evaluation settings."""
    path = Path(cfg.eval.qa.dense_reference)
    if not path.is_file():
        raise FileNotFoundError(f"eval.qa.dense_reference={str(path)!r} does not exist")
    ref = json.loads(path.read_text())
    scores = lm_eval_tasks.check_dense_reference(ref, model_name=cfg.model.name, tasks=tasks)
    theirs = ((ref.get("config") or {}).get("eval") or {}).get("qa") or {}
    for key in ("limit", "num_fewshot"):
        if theirs.get(key) != cfg.eval.qa.get(key):
            raise ValueError(f"dense reference {path} used eval.qa.{key}={theirs.get(key)!r}, "
                             f"this run uses {cfg.eval.qa.get(key)!r}: RP would compare different settings")
    return scores
