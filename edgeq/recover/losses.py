"""What the student is trained to match: the teacher's outputs (response loss) and, optionally, the outputs of
the modules both models share (intermediate features).

Each output gets the loss that fits what it holds (`output_kind`):
  logits     KL(teacher || student) of the softmaxes at temperature T, times T^2 (Hinton et al. 2015, "Distilling
             the Knowledge in a Neural Network": the T^2 keeps the gradients' size independent of T); with labels,
             cross-entropy on them is added.
  embedding  1 - cosine of each row (what retrieval and STS compare), plus the MSE relative to the teacher's
             mean square (keeps the norm, which cosine ignores).
  hidden     the MSE relative to the teacher's mean square, over the tokens the attention mask keeps when the
             model has one (padding positions are free to differ: nothing reads them).
Relative MSE (divided by the teacher's mean square) makes outputs and features of any scale weigh alike.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

KINDS = ("logits", "embedding", "hidden")
_EMBEDDING_WORDS = ("embed", "pool", "sentence", "feature", "vector")
_HIDDEN_WORDS = ("hidden", "state", "token", "last")


def output_kind(name: str, teacher_output: torch.Tensor) -> str:
    """"logits", "embedding" or "hidden" for an output named `name` whose teacher value is `teacher_output`.

    Names decide first (`*logits*`; embedding/pooled words; hidden-state words); then shape: a 2-D output whose
    rows have unit norm is an embedding, any other 2-D float output with at least two columns is taken as class
    logits (a classifier's `output`), and everything else (3-D and up, one column) as hidden states."""
    lowered = name.lower()
    if "logit" in lowered:
        return "logits"
    if any(word in lowered for word in _EMBEDDING_WORDS):
        return "embedding"
    if any(word in lowered for word in _HIDDEN_WORDS):
        return "hidden"
    if teacher_output.dim() == 2 and teacher_output.shape[-1] >= 2:
        norms = teacher_output.float().norm(dim=-1)
        return "embedding" if torch.allclose(norms, torch.ones_like(norms), atol=1e-3) else "logits"
    return "hidden"


def relative_mse(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """mean (s - t)^2 / mean t^2, over the elements `weights` keeps (broadcast from the leading dims) when given."""
    error, energy = (student - teacher).pow(2), teacher.pow(2)
    if weights is not None:
        while weights.dim() < error.dim():
            weights = weights.unsqueeze(-1)
        weights = weights.to(error.dtype).expand_as(error)
        return (error * weights).sum() / (energy * weights).sum().clamp_min(1e-12)
    return error.mean() / energy.mean().clamp_min(1e-12)


def response_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                  token_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one output (see the module docstring); `token_mask` [batch, tokens] for hidden states."""
    student, teacher = student.float(), teacher.float()
    if kind == "logits":
        t = temperature
        flat_s, flat_t = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        loss = F.kl_div(F.log_softmax(flat_s / t, dim=-1), F.log_softmax(flat_t / t, dim=-1), reduction="batchmean",
                        log_target=True) * t * t
        if labels is not None:
            loss = loss + F.cross_entropy(flat_s, labels.reshape(-1))
        return loss
    if kind == "embedding":
        cosine = F.cosine_similarity(student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1]), dim=-1)
        return (1 - cosine).mean() + relative_mse(student, teacher)
    mask = token_mask if token_mask is not None and tuple(token_mask.shape) == tuple(student.shape[: token_mask.dim()]) else None
    return relative_mse(student, teacher, mask)


class FeatureTaps:
    """Records the output of chosen modules on every forward (forward hooks), for the intermediate-feature loss.

    `names` are module FQNs of the model the taps go on; a module returning a tuple (a transformer layer) gives
    its first tensor."""

    def __init__(self, module: torch.nn.Module, names: list[str]):
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        modules = dict(module.named_modules())
        for name in names:
            self._handles.append(modules[name].register_forward_hook(self._recorder(name)))

    def _recorder(self, name: str):
        def record(_module, _inputs, output):
            while isinstance(output, (tuple, list)) and output:
                output = output[0]
            if isinstance(output, torch.Tensor):
                self.values[name] = output
        return record

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def feature_points(student: torch.nn.Module, teacher: torch.nn.Module) -> list[str]:
    """Module FQNs whose outputs the feature loss compares: the blocks of the models' longest nn.ModuleList
    (a transformer's layers, a ResNet stage's blocks) present in both; without a ModuleList, the leaf modules
    present in both. Only those whose outputs then have equal shapes are compared (pruning may change widths)."""
    teacher_names = dict(teacher.named_modules())
    lists = [(name, m) for name, m in student.named_modules() if isinstance(m, torch.nn.ModuleList) and name in teacher_names]
    if lists:
        name, longest = max(lists, key=lambda item: len(item[1]))
        return [f"{name}.{index}" for index in range(len(longest)) if f"{name}.{index}" in teacher_names]
    return [name for name, m in student.named_modules()
            if name and _is_leaf(m) and name in teacher_names and _is_leaf(teacher_names[name])]


def _is_leaf(module: torch.nn.Module) -> bool:
    """No children but QAT's weight parametrizations (a fake-quantized Linear is still the leaf it was)."""
    return all(name == "parametrizations" for name, _ in module.named_children())


def feature_loss(student_values: dict, teacher_values: dict, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
    """Mean relative MSE over the taps with equal shapes in both models, and how many there were."""
    losses = []
    for name, teacher_value in teacher_values.items():
        student_value = student_values.get(name)
        if student_value is None or student_value.shape != teacher_value.shape or not teacher_value.is_floating_point():
            continue
        mask = token_mask if token_mask is not None and tuple(token_mask.shape) == tuple(teacher_value.shape[: token_mask.dim()]) else None
        losses.append(relative_mse(student_value.float(), teacher_value.float(), mask))
    if not losses:
        return None, 0
    return torch.stack(losses).mean(), len(losses)
