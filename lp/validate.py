"""Every check of a composed config that needs no weights, in one pass before the model loads.

Two parts, both raising `ValueError` / `FileNotFoundError` with one line naming key, value and what
is allowed (the `run.py` shim prints it as `error: ...` and exits 2):

* `settings(cfg, choices)`: the config against its own defaults (`conf/<group>/<option>.yaml` of
  the chosen options, or of every option when the choices are unknown, e.g. a config composed in a
  test). The schema is the defaults themselves: a key no default defines is rejected (`+foo=1`,
  `+pruner.nn=3`); a key whose defaults are booleans takes only a real boolean (`true`/`false`,
  never the string "false" or `no`, so `model.trust_remote_code="false"` can never enable remote
  code); integers stay integers, floats numbers, lists lists. Then value ranges (`RULES`), the device
  (`cuda` without a GPU) and the data mirror (`data.root`, usually `LP_DATA_DIR`).
* `against_model(cfg, pruner, num_layers, max_positions, hidden_size)`: what needs the model's config
  (its layer count, context length and hidden size, read by `lp.run.check_model`): layer indices,
  sequence lengths, patch, datasets, tasks, distillation.

One entry point runs every check before any weights load: `lp.run.preflight` (settings, the pruner's
constructor, `check_model` -> `against_model`, the dense QA reference). A rule about a setting of one
component (a pruner's `n`, a patch kind's basis, distillation's optimizer, lm-eval task names) is defined
once, next to that component (`check_*` there), and called from here or from the component's constructor;
this module keeps only what is generic (types from the defaults, `RULES` for plain value ranges, device,
data mirror). Checks that need weights or data (non-finite activations, a cut a kind cannot bridge) are
the components' own, at use.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from lp import devices
from lp.models import DTYPES

CONF = Path(__file__).resolve().parents[1] / "conf"  # the repository's; a Hydra app's own comes first
OPEN = ("model.tiny",)  # nodes whose extra keys are passed on as keyword arguments (tiny model config)
ANY = "any"  # type of a default that is an interpolation (`${oc.env:...}`) or null
ALSO = {"eval.qa.batch_size": {"str"}, "eval.mmlu.batch_size": {"str"},  # besides the default's type: "auto"
        "calib.batch_size": {"str"}, "eval.ppl.batch_size": {"str"}, "distill.teacher_batch_size": {"int", "str"},
        "pruner.layers_per_pass": {"int", ANY}}  # default "auto"; an integer or null too


# ----------------------------------------------------------------------------- schema from the defaults
def _load_option(group_dir: Path, name: str) -> dict:
    """An option file as a plain dict, merged over the options its `defaults` list names (same group)."""
    raw = OmegaConf.to_container(OmegaConf.load(group_dir / f"{name}.yaml"), resolve=False) or {}
    merged: dict = {}
    for item in raw.pop("defaults", None) or []:
        if isinstance(item, str) and item != "_self_":
            merged = _merge(merged, _load_option(group_dir, item))
    return _merge(merged, raw)


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _is_global(file: Path) -> bool:
    return any("@package _global_" in line for line in file.read_text().splitlines()[:3])


def schema(choices: dict | None = None, conf: Path = CONF) -> dict[str, set]:
    """Dotted key -> set of default types ("bool", "int", "float", "str", "list", "dict", ANY; a list's
    element type as "list[int]"), from `conf/config.yaml` and each group's chosen option (every option
    of a group whose choice is unknown). Parsed once per process for the same choices and conf files
    (keyed by every YAML file's modification time, so an edited conf is read again)."""
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in sorted(conf.rglob("*.yaml")))
    key = (str(conf), tuple(sorted((choices or {}).items(), key=lambda kv: kv[0])), stamp)
    if key not in _SCHEMAS:
        if len(_SCHEMAS) >= 16:  # a few (conf, choices) pairs per process; never grows without bound
            _SCHEMAS.clear()
        _SCHEMAS[key] = _schema(choices, conf)
    return {k: set(v) for k, v in _SCHEMAS[key].items()}


_SCHEMAS: dict = {}


def _schema(choices: dict | None, conf: Path) -> dict[str, set]:
    types: dict[str, set] = {k: set(v) for k, v in ALSO.items()}
    top = OmegaConf.to_container(OmegaConf.load(conf / "config.yaml"), resolve=False)
    _add(types, "", {k: v for k, v in top.items() if k not in ("defaults", "hydra")})
    for group_dir in sorted(p for p in conf.iterdir() if p.is_dir() and p.name != "hydra"):
        group = group_dir.name
        chosen = (choices or {}).get(group, "*") if choices else "*"
        if chosen is None:
            continue
        files = sorted(f for f in group_dir.glob("*.yaml") if not f.stem.startswith("_")) if chosen == "*" \
            else [group_dir / f"{chosen}.yaml"]  # `_<part>.yaml`: shared by options (`_load_option`), not one
        for f in files:
            if not f.is_file():  # an option from another config source: its keys are not checked
                types.setdefault(group, set()).add(ANY)
            else:
                node = {k: v for k, v in _load_option(group_dir, f.stem).items() if k != "hydra"}
                _add(types, "" if _is_global(f) else group, node)
    return types


def _add(types: dict, prefix: str, value) -> None:
    key = prefix
    if isinstance(value, dict):
        if key:
            types.setdefault(key, set()).add("dict")
        for k, v in value.items():
            _add(types, f"{prefix}.{k}" if prefix else str(k), v)
        return
    types.setdefault(key, set()).add(_type(value))
    if isinstance(value, list) and value and len({_type(v) for v in value}) == 1:
        types[key].add(f"list[{_type(value[0])}]")


def _type(v) -> str:
    if v is None or (isinstance(v, str) and "${" in v):
        return ANY
    for t in (bool, int, float, str, list, dict):
        if isinstance(v, t):
            return t.__name__
    return ANY


def _fits(value, allowed: set) -> bool:
    if "bool" in allowed and not allowed - {"bool", ANY}:  # a boolean setting: nothing but a boolean
        return isinstance(value, bool)
    if value is None or ANY in allowed:  # null: "not set" (ranges are checked by RULES and the code)
        return True
    t = _type(value)
    if t == "int" and "float" in allowed:
        return True
    if t in ("int", "float") and "str" in allowed:  # a numeric-looking name (sweep_name=2024)
        return True
    if t not in allowed:
        return False
    elem = next((a[5:-1] for a in allowed if a.startswith("list[")), None)
    if t == "list" and elem and elem != ANY:
        return all(_fits(v, {elem}) for v in value)
    return True


# ----------------------------------------------------------------------------- settings
def conf_dir() -> Path:
    """The primary config folder of the running Hydra app (`run.py`'s `conf/`), else `CONF`."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        for src in HydraConfig.get().runtime.config_sources:
            if src.provider == "main" and src.schema == "file":
                return Path(src.path)
    return CONF


def settings(cfg: DictConfig, choices: dict | None = None, conf: Path | None = None) -> None:
    """Check `cfg` against its defaults and the value rules; raises naming key, value and what is allowed."""
    conf = conf or conf_dir()
    if conf.is_dir():
        types = schema(choices, conf)
        _walk(OmegaConf.to_container(cfg, resolve=True), "", types)
    for key, ok, allowed in RULES:
        if OmegaConf.select(cfg, key, default=_MISSING) is _MISSING:
            continue
        value = OmegaConf.select(cfg, key)
        if not ok(value):
            raise ValueError(f"{key}={value!r}: must be {allowed}")
    device(cfg.model.get("device"))
    devices.check_placement(cfg.model)
    root = cfg.data.get("root")
    if root is not None and not Path(str(root)).expanduser().is_dir():
        raise FileNotFoundError(f"data.root={str(root)!r} (LP_DATA_DIR by default) is not a folder; point "
                                "LP_DATA_DIR or data.root at the data mirror, or set data.root=null to use the hub")


_MISSING = object()


def _walk(node, prefix: str, types: dict) -> None:
    for k, v in node.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if key not in types:
            if prefix.startswith(OPEN) or prefix in OPEN:
                continue
            siblings = sorted(t.rsplit(".", 1)[-1] for t in types if t.rpartition(".")[0] == prefix)
            close = difflib.get_close_matches(str(k), siblings, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            where = f"the options chosen for {prefix.split('.')[0]}" if prefix else "conf/config.yaml"
            raise ValueError(f"unknown setting {key}={_show(v)}: no key {k!r} in {where}{hint}; "
                             f"known: {siblings}")
        allowed = types[key]
        if isinstance(v, dict) and "dict" in allowed:
            _walk(v, key, types)
        elif isinstance(v, dict) and ANY in allowed:
            continue  # a node of unknown structure (e.g. an option file outside conf/)
        elif not _fits(v, allowed):
            raise ValueError(f"{key}={_show(v)}: must be {_describe(allowed)}")


def _show(v) -> str:
    return repr(v) if isinstance(v, str) else str(v).replace("True", "true").replace("False", "false")


def _describe(allowed: set) -> str:
    if allowed == {"bool"}:
        return "true or false (a YAML boolean, not a string)"
    names = {"int": "an integer", "float": "a number", "str": "a string", "list": "a list", "dict": "a mapping"}
    elem = next((a[5:-1] for a in allowed if a.startswith("list[")), None)
    words = [names.get(a, a) for a in sorted(allowed) if not a.startswith("list[")]
    if elem and elem != ANY:
        words = [f"a list of {elem}s" if w == "a list" else w for w in words]
    return " or ".join(words)


def _int(lo: int, allow_none: bool = False):
    return lambda v: (v is None and allow_none) or (isinstance(v, int) and not isinstance(v, bool) and v >= lo)


def _auto(v) -> bool:
    """lm-eval's automatic batch size: "auto" or "auto:<N>" (N re-detections over the run)."""
    return isinstance(v, str) and (v == "auto" or (v.startswith("auto:") and v[5:].replace(".", "", 1).isdigit()))


def _holdout(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v < 1


RULES = [  # (key, predicate, what is allowed); keys absent from the config are skipped
    ("seed", _int(0), "an integer >= 0"),
    ("calib.nsamples", _int(1), "an integer >= 1"),
    ("calib.seqlen", _int(2), "an integer >= 2"),
    ("calib.batch_size", lambda v: _int(1)(v) or v == "auto", "an integer >= 1 or auto (lp.batching)"),
    ("calib.seed", _int(0), "an integer >= 0"),
    ("calib.holdout", _holdout, "a fraction in [0, 1)"),
    ("eval.ppl.seqlen", _int(2), "an integer >= 2"),
    ("eval.ppl.batch_size", lambda v: _int(1)(v) or v == "auto", "an integer >= 1 or auto (lp.batching)"),
    ("distill.teacher_batch_size", lambda v: v is None or _int(1)(v) or v == "auto",
     "null (distill.batch_size), an integer >= 1 or auto (lp.batching)"),
    ("eval.ppl.max_windows", _int(1, allow_none=True), "null (all windows) or an integer >= 1"),
    ("eval.qa.limit", _int(1, allow_none=True), "null (full sets) or an integer >= 1"),
    ("eval.qa.batch_size", lambda v: _int(1)(v) or _auto(v), "an integer >= 1, 'auto' or 'auto:<N>' (lm-eval)"),
    ("eval.qa.num_fewshot", _int(0, allow_none=True), "null or an integer >= 0"),
    ("eval.mmlu.limit", _int(1, allow_none=True), "null (full sets) or an integer >= 1"),
    ("eval.mmlu.batch_size", lambda v: _int(1)(v) or _auto(v), "an integer >= 1, 'auto' or 'auto:<N>' (lm-eval)"),
    ("eval.mmlu.num_fewshot", _int(0, allow_none=True), "null or an integer >= 0"),
    ("data.source", lambda v: v in ("auto", "local", "hub"), "one of ['auto', 'local', 'hub']"),
    ("model.dtype", lambda v: v in DTYPES, f"one of {sorted(DTYPES)}"),
]


def device(value) -> None:
    """`model.device`: auto, cpu, cuda[:i] (a visible GPU) or another torch device string."""
    if value in (None, "auto"):
        return
    try:
        dev = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"model.device={value!r}: must be auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"model.device={value!r} but no CUDA GPU is visible here; use model.device=cpu "
                             "(or auto: the GPU where there is one)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"model.device={value!r} but only {n} GPU(s) are visible (cuda:0..cuda:{n - 1})")


# ----------------------------------------------------------------------------- against the model's config
def against_model(cfg: DictConfig, pruner, num_layers: int, max_positions: int | None,
                  hidden_size: int | None = None) -> None:
    """Every check that needs the model's config but no weights."""
    from lp import data, methods, verify
    from lp import patches as patch_kinds
    from lp.evaluate import generate, lm_eval_tasks
    from lp.evaluate.ppl import check_loss_dtype
    from lp.patch import check_patch

    pruner.check(num_layers)
    kind = cfg.patch.kind
    patch_kinds.check_name(kind)
    reported = data.ppl_sets(cfg.eval.ppl.datasets, cfg.eval.ppl.split) if cfg.eval.get("ppl") else []
    verify_on = cfg.patch.get("verify_on")  # None (a config without it) reads as calib: lp.verify.verify_on
    verify.check_settings(cfg.calib, kind, getattr(pruner, "rerank", 0), verify_on, reported)
    if kind != "none" and pruner.name == "none":
        raise ValueError(f"patch={kind} needs layers to remove, but pruner=none removes nothing")
    if kind != "none" and methods.prunes_width(pruner.name):
        raise ValueError(f"patch={kind} bridges removed layers, but pruner={pruner.name} prunes width (attention "
                         "heads and MLP channels) and removes no layer; use patch=none")
    if hidden_size:
        check_patch(cfg.patch, hidden_size)  # e.g. no Hadamard matrix for this hidden size
    layers = getattr(pruner, "layers", None)  # known before loading (pruner=manual; not a method of another pruner)
    if layers is not None and not callable(layers) and 0 in layers and kind in patch_kinds.KINDS and patch_kinds.KINDS[kind].site == "mlp":
        raise ValueError(f"patch={kind} acts on the MLP output of the last kept layer before each cut, but "
                         f"pruner.layers={list(layers)} removes layer 0 (no kept layer before that cut); "
                         "keep layer 0 or use an input-site kind such as lstsq/rotate")
    generate.check_generate(cfg.eval.get("generate"))
    seqlens = {"calib.seqlen": cfg.calib.seqlen}
    if cfg.eval.get("ppl"):
        seqlens["eval.ppl.seqlen"] = cfg.eval.ppl.seqlen
        check_loss_dtype(cfg.eval.ppl.get("loss_dtype", "float32"))
        for name, split in data.ppl_sets(cfg.eval.ppl.datasets, cfg.eval.ppl.split):
            data.resolve(name, split, cfg.data.root, cfg.data.source)
    for key, value in seqlens.items():
        if max_positions and value > max_positions:
            raise ValueError(f"{key}={value} exceeds the model's context ({max_positions} positions)")
    for section in ("qa", "mmlu"):
        if cfg.eval.get(section):
            lm_eval_tasks.check_tasks(cfg.eval[section].tasks, cfg.data.root)
    if getattr(pruner, "needs_calibration", False) or kind != "none" or (cfg.calib.get("nval") and pruner.name != "none"):
        # patch scales and the held-out windows need the calibration corpus too
        data.resolve(cfg.calib.corpus, cfg.calib.split, cfg.data.root, cfg.data.source)
    if (target := verify.verify_on(verify_on)) and cfg.calib.get("nval") and pruner.name != "none":
        data.resolve(*target, cfg.data.root, cfg.data.source)  # the held-out windows' split (patch.verify_on)
    if cfg.distill.name != "none":
        from lp import distill as distill_mod

        distill_mod.check_patch(cfg.distill, cfg.patch)
        distill_mod.check_config(cfg.distill, max_positions)
