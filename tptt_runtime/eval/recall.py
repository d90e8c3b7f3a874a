"""`tptt-eval --probe`: where passkey recall fails, by swapping oracles into every layer's Memory-as-Gate mix.

Full causal attention splits exactly into o_full = (1 - lam) o_window + lam o_far (lam: the softmax mass beyond
the window and sinks, o_far: the attention output over those keys alone). The converted model replaces o_far
by its memory read and lam by its gate. Each mode below swaps one or both for the truth, in every layer, and
reports how many of the passkey's digits the model then predicts (teacher-forced), so a failing recall can be
pinned on the memory read, on the gate or on the mix:

    model         the adapter as it is
    exact         (1 - lam) o_window + lam o_far: full attention again (a self-check of the probe; exact
                  without sinks, else up to the sinks' rotary positions, which the window branch puts
                  just before the window)
    perfect-read  o_far as the memory read and mu = lam, through the model's own mix
    own-read      the model's memory read (at o_far's norm per head) with mu = lam
    own-gate      o_far as the memory read with the model's own gate
    own-far-norm  both of the model's own halves, the read at o_far's norm per head, mixed per head as full
                  attention mixes (what the model lacks when only the per-head sizes of its read are wrong)
    own-head-rms  both own halves, the read at the softmax branch's RMS per head instead of over all heads
                  (a mix the server could run: does a per-head RMS match fix what the all-heads one breaks?)

Also per context, at the positions that read the key: the lam-weighted cosine between the memory read and
o_far, and the mean gate against the mean lam. Inference only, through the layers' documented hook (LayerHook),
set for the duration of a forward.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from ..layers.full_attention import split_attention
from ..layers.liza import LayerHook, merge_heads
from .passkey import passkey_prompt

MODES = ("model", "exact", "perfect-read", "own-read", "own-gate", "own-far-norm", "own-head-rms")


class Probe(LayerHook):
    """Mixes every layer as `mode` says; appends each layer's (lam, mu, cosine) [B, Hq, T] to `readings`."""

    def __init__(self, mode: str, readings: list):
        if mode not in MODES:
            raise ValueError(f"unknown probe mode {mode!r}; one of {MODES}")
        self.mode, self.readings, self.projected = mode, readings, {}

    def prefill(self, layer, hidden_states, q, k, v):
        self.projected[layer.layer_idx] = (q, k, v)  # kept for the mix of the same layer

    def mix(self, layer, hidden_states, softmax_out, read, seen):
        q, k, v = self.projected.pop(layer.layer_idx)  # read: [B, Hq, T, D]
        _, o_far, lam = split_attention(q, k, v, layer)  # [B, Hq, T, D], [B, Hq, T]
        mu = layer.memory_weight(hidden_states, seen)  # [B or 1, T, Hq * D or 1]
        mu_per_head = mu[..., ::layer.head_dim].transpose(1, 2).expand_as(lam)  # [B, Hq, T]
        self.readings.append((lam, mu_per_head, F.cosine_similarity(read, o_far, dim=-1)))

        def split_by_lam(far):  # (1 - lam) o_window + lam far, per head, as full attention combines them
            return layer.o_proj(merge_heads(torch.lerp(softmax_out, far, lam.unsqueeze(-1))))

        def sized_far():  # o_far as the model sizes its reads (a learned scale means to make them o_far-sized)
            return o_far if layer.read_scale is not None else layer.sized_read(o_far, softmax_out)

        mode = self.mode
        if mode == "model":
            return layer.mix(softmax_out, layer.sized_read(read, softmax_out), mu)
        if mode == "exact":
            return split_by_lam(o_far)
        if mode == "perfect-read":
            return layer.mix(softmax_out, sized_far(), lam.transpose(1, 2).repeat_interleave(layer.head_dim, dim=-1))
        if mode == "own-read":
            return split_by_lam(F.normalize(read, dim=-1) * o_far.norm(dim=-1, keepdim=True))
        if mode == "own-gate":
            return layer.mix(softmax_out, sized_far(), mu)
        per_head_mu = mu_per_head.unsqueeze(-1)
        if mode == "own-far-norm":
            at_far_norm = F.normalize(read, dim=-1) * o_far.norm(dim=-1, keepdim=True)
            return layer.o_proj(merge_heads(torch.lerp(softmax_out, at_far_norm, per_head_mu)))
        at_head_rms = F.normalize(read, dim=-1) * softmax_out.norm(dim=-1, keepdim=True)  # own-head-rms
        return layer.o_proj(merge_heads(torch.lerp(softmax_out, at_head_rms, per_head_mu)))


@contextlib.contextmanager
def probing(model, mode: str, readings: list):
    """Every LiZA layer of `model` mixes as `mode` says inside the block (through the layers' LayerHook)."""
    with model.hooked(Probe(mode, readings)):
        yield


def probe_logits(model, ids: list[int], mode: str) -> tuple[torch.Tensor, list]:
    """Logits [T, vocab] of a whole sequence under `mode`, and each layer's (lam, mu, cosine) [1, Hq, T]."""
    readings = []
    with probing(model, mode, readings):
        logits = model.forward_full(ids)
    return logits, readings


def probe(model, contexts: list[int], depths=(0.1, 0.3, 0.5, 0.7), modes=MODES) -> dict:
    """{context: {mode: share of key digits predicted right, "cosine"/"mu"/"lam": at the reads}}."""
    tokenizer = model.tokenizer
    results = {}
    for context in contexts:
        row = {mode: 0.0 for mode in modes}
        cosines, mus, lams = [], [], []
        for seed, depth in enumerate(depths):
            prompt, key = passkey_prompt(tokenizer, context, depth, seed)
            answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
            reads = list(range(len(prompt) - 1, len(prompt) + len(answer) - 1))
            for mode in modes:
                logits, readings = probe_logits(model, prompt + answer, mode)
                right = (logits[reads].argmax(-1) == torch.tensor(answer, device=logits.device)).float().mean()
                row[mode] += right.item() / len(depths)
                if mode == modes[0]:
                    for lam, mu, cosine in readings:
                        lam, mu, cosine = lam[0][:, reads], mu[0][:, reads], cosine[0][:, reads]
                        cosines.append(((cosine * lam).sum() / lam.sum().clamp(min=1e-6)).item())
                        mus.append(mu.mean().item())
                        lams.append(lam.mean().item())
        row.update(cosine=sum(cosines) / len(cosines), mu=sum(mus) / len(mus), lam=sum(lams) / len(lams))
        results[str(context)] = row
    return results


def table(results: dict) -> str:
    modes = [m for m in MODES if m in next(iter(results.values()))]
    header = f"{'context':>8} | " + " ".join(f"{m:>12}" for m in modes) + " | cos(read, far)   mu    lam"
    lines = ["share of passkey digits predicted (teacher-forced), by what every layer mixes:", header,
             "-" * len(header)]
    for context, row in results.items():
        lines.append(f"{context:>8} | " + " ".join(f"{row[m]:>12.2f}" for m in modes)
                     + f" | {row['cosine']:>14.2f} {row['mu']:>5.2f} {row['lam']:>6.2f}")
    return "\n".join(lines)


def figure(results: dict):
    from ..bench import report

    fig, ax = report.subplots(1, 1, figsize=(8, 4))
    modes = [m for m in MODES if m in next(iter(results.values()))]
    width = 0.8 / len(results)
    for i, (context, row) in enumerate(results.items()):
        ax.bar([m + i * width for m in range(len(modes))], [row[mode] for mode in modes], width,
               label=f"{context} tokens")
    ax.set_xticks([m + 0.4 - width / 2 for m in range(len(modes))], modes)
    ax.set_ylim(0, 1)
    ax.set_ylabel("passkey digits predicted")
    ax.set_title("Recall probe: what every layer mixes (teacher-forced passkey)")
    ax.legend()
    return fig
