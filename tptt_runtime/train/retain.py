"""Fitting the exact-token cache's retaining heads (cache_score "retain": layers/retaining.py, docs/math.md 3b).

Each layer's head learns to tell the tokens that state a fact from the rest, on retrieval documents
(train/retrieval.py) run through the model as it stands: the tokens a later question will need, which the
cache should hold once the window has let them go. The features come through the layers' documented hook
(LayerHook.prefill: q, k, v before rotary) in one forward per document; the heads are then fitted layer by
layer, full batch, as classifiers (balanced binary cross-entropy, each feature standardized, the
standardization folded into the first weights afterwards). Nothing but the heads changes; nothing of it is in
serving.

    documents, stated = retain_documents(tokenizer, sequences, count=60, seed=0)
    report = fit_retaining_heads(model, documents, stated)
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..layers.liza import LayerHook, LiZAttention
from ..layers.retaining import HIDDEN, head_features
from .retrieval import with_retrieval

log = logging.getLogger(__name__)

CHAT_SHARE = 0.5       # share of the fitting documents in chat form (0 for a tokenizer without a chat template)
NEGATIVE_SHARE = 0.1   # share of the other tokens kept as examples (a statement is a few % of a document)
ITERATIONS = 200       # full-batch Adam iterations per layer
LR = 3e-3
WEIGHT_DECAY = 1e-4
VALIDATION_SHARE = 0.2  # the last documents, held out to report each layer's validation loss
STD_FLOOR = 1e-2       # a feature's standard deviation counts as at least this share of its head's mean one


def retain_documents(tokenizer, sequences: torch.Tensor, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` retrieval documents [count, T] built on a seeded sample of `sequences` (prose) and the mask of
    their statements' tokens [count, T]."""
    if not 1 <= count <= len(sequences):
        raise ValueError(f"need 1 .. {len(sequences)} documents to fit the retaining heads, got {count}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(sequences), generator=generator)[:count]
    chat_share = CHAT_SHARE if getattr(tokenizer, "chat_template", None) else 0.0
    documents = with_retrieval(tokenizer, sequences[rows], 1.0, seed, chat_share=chat_share)
    return documents.ids, documents.stated


def fit_retaining_heads(model, documents: torch.Tensor, stated: torch.Tensor, seed: int = 0) -> dict:
    """Fit every layer's retaining head on `documents` [N, T] whose `stated` [N, T] tokens are the positives;
    returns the mean training and validation losses (balanced BCE; chance is ln 2 = 0.69; no validation loss
    with fewer than 5 documents)."""
    if not model.config.retains:
        raise ValueError('fitting retaining heads needs cache_score "retain" with cache_tokens > 0')
    if not stated.any():
        raise ValueError("the documents state no fact: nothing to fit the retaining heads to")
    features, labels = _collect(model, documents, stated, seed)
    split = _validation_start(labels, documents.shape[0])
    losses = [_fit_layer(layer, features[layer.layer_idx], labels, split, seed)
              for layer in tqdm(model.layers, desc="retaining heads", unit="layer")]
    train_loss = sum(training for training, _ in losses) / len(losses)
    validation_loss = None if split == len(labels) else sum(held_out for _, held_out in losses) / len(losses)
    log.info("retaining heads: balanced BCE %.3f (training), %s (validation), chance 0.693", train_loss,
             "-" if validation_loss is None else f"{validation_loss:.3f}")
    return {"stage": "retain", "loss": train_loss, "validation_loss": validation_loss,
            "documents": documents.shape[0]}


class _FeatureCapture(LayerHook):
    """Keeps each layer's head features [Hkv, n, F] of the `keep` positions of a one-row forward."""

    def __init__(self, keep: torch.Tensor):
        self.keep, self.features = keep, {}

    def prefill(self, layer: LiZAttention, hidden_states, q, k, v) -> None:
        self.features[layer.layer_idx] = head_features(q, k, v)[0][:, self.keep.to(q.device)].cpu()
        return None


def _collect(model, documents, stated, seed: int) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Features per layer [Hkv, n, F] of every statement token and a seeded NEGATIVE_SHARE of the others, in
    document order, and their labels [n] (1: the token states a fact)."""
    generator = torch.Generator().manual_seed(seed)
    features, labels = {}, []
    model.hf.eval()
    for ids, positives in tqdm(zip(documents, stated), total=len(documents), desc="retaining features",
                               unit="doc"):
        keep = positives | (torch.rand(positives.shape, generator=generator) < NEGATIVE_SHARE)
        with model.hooked(_FeatureCapture(keep)) as hook, torch.no_grad():
            model.hf(input_ids=ids[None].to(model.device), use_cache=False, logits_to_keep=1)
        for index, captured in hook.features.items():
            features.setdefault(index, []).append(captured)
        labels.append(positives[keep].float())
    return {index: torch.cat(parts, dim=1) for index, parts in features.items()}, torch.cat(labels)


def _validation_start(labels: torch.Tensor, documents: int) -> int:
    """The example where validation starts: about the last VALIDATION_SHARE of the examples (none with fewer
    than 5 documents: all of them train)."""
    return len(labels) if documents < 5 else int(len(labels) * (1 - VALIDATION_SHARE))


def _fit_layer(layer: LiZAttention, x: torch.Tensor, y: torch.Tensor, split: int, seed: int) -> tuple[float, float]:
    """Fit one layer's head on features x [Hkv, n, F] and labels y [n] (the first `split` examples; the rest
    validate), on the layer's device, and write it into the layer; returns its (training, validation) balanced
    BCE (validation: the training loss again when nothing is held out)."""
    device = layer.retaining_head.w1.device
    x, y = x.to(device), y.to(device)
    heads, _, width = x.shape
    mean, std = x[:, :split].mean(1, keepdim=True), x[:, :split].std(1, keepdim=True)
    std = std.clamp(min=STD_FLOOR * std.mean(-1, keepdim=True))  # a near-constant feature is not blown up
    x = (x - mean) / std
    generator = torch.Generator().manual_seed(seed * 1000 + layer.layer_idx)
    w1 = (torch.randn(heads, width, HIDDEN, generator=generator) / width ** 0.5).to(device).requires_grad_()
    b1 = torch.zeros(heads, HIDDEN, device=device, requires_grad=True)
    w2 = (torch.randn(heads, HIDDEN, generator=generator) / HIDDEN ** 0.5).to(device).requires_grad_()
    b2 = torch.zeros(heads, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([w1, b1, w2, b2], lr=LR, weight_decay=WEIGHT_DECAY)

    def loss(part: slice) -> torch.Tensor:
        hidden = torch.relu(torch.einsum("hnf,hfk->hnk", x[:, part], w1) + b1[:, None])
        logits = torch.einsum("hnk,hk->hn", hidden, w2) + b2[:, None]
        return _balanced_bce(logits, y[part].expand(heads, -1))

    with torch.enable_grad():
        for _ in range(ITERATIONS):
            optimizer.zero_grad(set_to_none=True)
            training = loss(slice(0, split))
            training.backward()
            optimizer.step()
    with torch.no_grad():
        validation = loss(slice(split, None)) if split < len(y) else loss(slice(0, split))
        head = layer.retaining_head
        head.w1.copy_(w1 / std.transpose(1, 2))  # standardization folded in: w1 . (x - m) / s
        head.b1.copy_(b1 - torch.einsum("hf,hfk->hk", (mean / std)[:, 0], w1))
        head.w2.copy_(w2)
        head.b2.copy_(b2)
    return training.item(), validation.item()


def _balanced_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with positives and negatives weighted to equal total weight (chance: ln 2)."""
    positives = labels.sum().clamp(min=1)
    negatives = (labels.numel() - labels.sum()).clamp(min=1)
    weights = torch.where(labels > 0, 0.5 / positives, 0.5 / negatives)
    return (F.binary_cross_entropy_with_logits(logits, labels, reduction="none") * weights).sum()
