"""Output-KL distillation of LinearPatch matrices (`distill=output_kl`).

After training-free patching, only the patch matrices are fine-tuned so that the pruned model's
next-token distribution matches the dense model's:

  * teacher (`lp.distill.teacher`): the *dense* model (before `drop_layers`); its top-k logits per
    token (k = 50) are computed once and cached on disk;
  * student (`lp.distill.student`): the pruned + patched model from its first patch onwards, run
    with the layer-replay engine `lp.replay`; its logits are taken at the teacher's k indices;
  * loss: KL(teacher || student) over that support, both renormalised with a softmax over the k
    entries, averaged per token (`topk_kl`);
  * loop (`lp.distill.train`): optimizer and LR schedule from `distill.optimizer` /
    `distill.scheduler`; settings checked before any weights load (`lp.distill.config`).

Shapes: windows `[N, T]` token ids; teacher indices / logits `[N, T, k]`; hidden states `[B, T, D]`.
"""

from lp.distill.config import check_config, check_patch, resolve_autocast
from lp.distill.student import PrefixStates, Suffix, full_student_loss, topk_kl
from lp.distill.teacher import (
           TeacherCache,
           build_teacher,
           cache_bytes,
           distill_windows,
    key_hash,
           prepare_teacher,
           teacher_key,
)
from lp.distill.train import distill, metrics, skipped

__all__ = ["TeacherCache", "Suffix", "PrefixStates", "build_teacher", "prepare_teacher", "distill", "metrics",
           "topk_kl", "full_student_loss", "check_config", "check_patch", "skipped", "resolve_autocast", "teacher_key", "key_hash", "distill_windows",
           "cache_bytes"]
