"""Targets: the score of a class that a map explains, one small function per kind (the keys of
``domain.TARGET_KINDS``, the proto enum ``TargetKind``). Definitions follow pytorch-grad-cam's
``utils/model_targets.py``, the reference the tests compare against. Each takes the logits
(n, outputs), each row's class (n,) and each row's concept (n, outputs; the similarity
target's, else None)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn.functional as F

FINER_COMPARISONS = (1, 2, 3)  # FinerCAM's confusers: the nearest logits after the class's own
FINER_ALPHA = 1.0


def _logit(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """ClassifierOutputTarget: the class's logit."""
    return logits.gather(1, classes[:, None])[:, 0]


def _softmax(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """ClassifierOutputSoftmaxTarget: the class's softmax probability."""
    return torch.softmax(logits, dim=1).gather(1, classes[:, None])[:, 0]


def _rest(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """ClassifierOutputReST (Cai et al. 2025, "this class against the rest"): the logit minus
    the class's cross-entropy, z_c - (logsumexp(z) - z_c)."""
    own = _logit(logits, classes)
    return 2 * own - torch.logsumexp(logits, dim=1)


def _raw_scores(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """RawScoresOutputTarget: every output, summed (a single-output model's score)."""
    return logits.sum(dim=1)


def _finer(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """FinerWeightedTarget (Zhang et al. 2025, FinerCAM), as pytorch-grad-cam's FinerCAM builds
    it: the classes whose logits are nearest to the class's own (by |z_j - z_c|, the class
    itself first) at FINER_COMPARISONS are its confusers; the score is
    sum_j p_j (z_c - alpha z_j) / (sum_j p_j + 1e-9), p the softmax probabilities (whose
    gradient counts too)."""
    own = _logit(logits, classes)
    distance = (logits.detach() - own.detach()[:, None]).abs()
    order = torch.argsort(distance, dim=1)
    picks = [c for c in FINER_COMPARISONS if c < logits.shape[1]]
    others = order[:, picks]
    weights = torch.softmax(logits, dim=1).gather(1, others)
    margin = own[:, None] - FINER_ALPHA * logits.gather(1, others)
    return (weights * margin).sum(dim=1) / (weights.sum(dim=1) + 1e-9)


def _sigmoid(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """A multi-label (sigmoid) model's probability of the class, sigmoid(z_c)."""
    return torch.sigmoid(_logit(logits, classes))


def _similarity(logits: torch.Tensor, classes: torch.Tensor, concepts=None) -> torch.Tensor:
    """SimilarityToConceptTarget: the cosine similarity of the output to the row's concept."""
    return F.cosine_similarity(logits, concepts.to(logits.device, logits.dtype), dim=1)


TARGETS: Dict[str, Callable[..., torch.Tensor]] = {
    "logit": _logit, "softmax": _softmax, "rest": _rest, "raw_scores": _raw_scores,
    "finer": _finer, "sigmoid": _sigmoid, "similarity": _similarity,
}


def target_scores(logits: torch.Tensor, classes: torch.Tensor, kind: str,
                  concepts: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each row's score of its class: ``logits`` (n, classes), ``classes`` (n,), ``concepts``
    (n, classes; the similarity target's) -> (n,)."""
    return TARGETS[kind](logits.float(), classes, concepts)


def concepts(specs, rows: Sequence[int], kind: str) -> Optional[torch.Tensor]:
    """The similarity target's concepts of ``rows`` (their ExplainSpecs' ``concept``), one row
    each; None for another kind."""
    if kind != "similarity":
        return None
    return torch.tensor([specs[i].concept for i in rows], dtype=torch.float32)
