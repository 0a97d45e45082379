"""Where the fine-grained attention looks: weight on relevant vs irrelevant frames of partial clips.

On tri-modal AV-Digits with ``partial_rate`` > 0, a block of some training clips' frames is taken from
another digit's clip (``relevant_frames`` is False there). For each such clip and its own captions, the
``over_a`` attention α_kj of :func:`~harmonia.losses.finegrained.paired_attention` (each word's
softmax over the clip's video tokens) is averaged over the real words of the real candidates, giving one
weight per video token that sums to one over the clip. A tubelet token covers ``tubelet[0]`` frames: it is
relevant if all of them are, irrelevant if none is (tokens straddling the boundary are left out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from harmonia.data.trimodal import TriModalSplit
from harmonia.losses.finegrained import paired_attention
from harmonia.models.pretrain import TriModalPretrainModel


@dataclass
class FrameAttention:
    """Per-token attention ``weights`` [N, T', H'·W'] of N partial clips (token grid: time slots × space),
    the clips' ``indices`` in the split and the time slots' relevance ``slot_relevant`` [N, T'] (1 relevant,
    0 irrelevant, -1 mixed)."""

    indices: Tensor
    weights: Tensor
    slot_relevant: Tensor

    def mean_weight(self) -> dict[str, float]:
        """Mean attention per token on relevant and irrelevant tokens, relative to uniform attention
        (1.0 = 1 / tokens per clip), and their ratio."""
        per_token = self.weights * self.weights[0].numel()
        slots = self.slot_relevant[..., None].expand_as(per_token)
        relevant, irrelevant = per_token[slots == 1].mean(), per_token[slots == 0].mean()
        return {
            "relevant": float(relevant),
            "irrelevant": float(irrelevant),
            "ratio": float(relevant / irrelevant),
        }


@torch.no_grad()
def frame_attention(
    model: TriModalPretrainModel,
    split: TriModalSplit,
    tau_att: float,
    tubelet_frames: int,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    max_clips: int | None = None,
) -> FrameAttention:
    """``over_a`` attention of ``model``'s video–text token embeddings on the partial clips of ``split``
    (the first ``max_clips`` of them when given)."""
    partial = (~split.relevant_frames).any(1).nonzero().flatten()[:max_clips]
    if len(partial) == 0:
        raise ValueError("frame_attention: the split has no partial clips (set data.trimodal.partial_rate)")
    was_training = model.training
    model.eval()
    weights = []
    try:
        for start in range(0, len(partial), batch_size):
            index = partial[start : start + batch_size]
            inputs = {k: split.inputs[k][index].to(device) for k in ("video", "audio", "text", "text_mask")}
            out = model(inputs, return_tokens=True)
            words = out.token_masks["text"]  # [n, C, L]; a padded candidate has no word
            alpha = paired_attention(out.tokens["video_vt"], out.tokens["text"], None, words, tau_att)[
                "over_a"
            ]
            real = words.to(alpha.dtype)[:, :, None, :]  # [n, C, 1, L]
            weights.append(((alpha * real).sum((1, 3)) / real.sum((1, 3))).float().cpu())
    finally:
        model.train(was_training)
    per_token = torch.cat(weights)  # [N, K]
    frames = split.relevant_frames[partial]  # [N, T]
    slots = frames.view(len(partial), -1, tubelet_frames)
    relevance = torch.where(slots.all(-1), 1, torch.where(~slots.any(-1), 0, -1))
    return FrameAttention(partial, per_token.view(len(partial), relevance.shape[1], -1), relevance)


def plot_frame_attention(
    attention: FrameAttention, split: TriModalSplit, path: str, clips: int = 4, title: str = ""
) -> None:
    """Frames of a few partial clips (unrelated frames outlined in red) above the attention each time
    slot receives (the sum over its spatial tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = range(min(clips, len(attention.indices)))
    frames = split.inputs["video"].shape[2]
    slots = attention.weights.shape[1]
    per_slot = frames // slots
    fig, axes = plt.subplots(
        2 * len(chosen),
        frames,
        figsize=(1.1 * frames, 2.3 * len(chosen)),
        squeeze=False,
        gridspec_kw={"height_ratios": [1, 0.6] * len(chosen)},
    )
    for row, n in enumerate(chosen):
        i = int(attention.indices[n])
        slot_mass = attention.weights[n].sum(-1)  # [T']
        for t in range(frames):
            ax = axes[2 * row][t]
            ax.imshow(split.inputs["video"][i, 0, t].numpy(), cmap="gray")
            ax.set_xticks([]), ax.set_yticks([])
            relevant = bool(split.relevant_frames[i, t])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if relevant else "tab:red")
                spine.set_linewidth(2.5)
            bar = axes[2 * row + 1][t]
            bar.bar(
                [0],
                [float(slot_mass[t // per_slot]) / per_slot],
                color="tab:green" if relevant else "tab:red",
            )
            bar.set_ylim(0, 2.0 / frames * 1.5)
            bar.axhline(1.0 / frames, color="gray", lw=0.8, ls="--")
            bar.set_xticks([])
            if t:
                bar.set_yticks([])
        caption = split.captions[i][0] if split.captions else ""
        axes[2 * row][0].set_title(f'clip {i}: "{caption}"', fontsize=8, loc="left")
        axes[2 * row + 1][0].set_ylabel("attention", fontsize=7)
    fig.suptitle(title or "attention per frame (dashed: uniform); red: unrelated frames", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
