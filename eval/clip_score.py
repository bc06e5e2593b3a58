"""CLIP score (torchmetrics' CLIPScore) with any local CLIP checkpoint, under transformers 5.

torchmetrics calls `get_image_features` / `get_text_features` and expects tensors; in transformers 5 both
return an output object whose `pooler_output` holds the projected vector. `PooledClip` hands torchmetrics
that vector. Captions longer than the text tower's context are truncated by the tokenizer (keeping its
end-of-text token, which CLIP pools at) with a warning that counts them.

No pretrained CLIP is available offline: `load_clip_score` then returns None and a one-line notice, and
the score is left out of the report (never estimated some other way).

    scorer, notice = load_clip_score("openai/clip-vit-base-patch16")   # or a local directory
    scorer(images_uint8, captions) if scorer else print(notice)
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor


class PooledClip(nn.Module):
    """A CLIPModel whose feature methods return the projected pooled vectors, as torchmetrics expects."""

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.clip, self.config = clip, clip.config

    @staticmethod
    def _pooled(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._pooled(self.clip.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self._pooled(self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


class TruncatingProcessor:
    """A CLIPProcessor that truncates captions to the text tower's context and counts those it cut."""

    def __init__(self, processor: CLIPProcessor, context: int):
        self.processor, self.context = processor, context
        self.truncated = 0

    def __call__(self, text=None, images=None, **kwargs):
        if text is not None:
            too_long = sum(len(ids) > self.context for ids in self.processor.tokenizer(text)["input_ids"])
            if too_long:
                self.truncated += too_long
                warnings.warn(f"CLIP score: {too_long} of {len(text)} captions exceed the model's {self.context} "
                              "tokens and are truncated", stacklevel=2)
            kwargs.update(truncation=True, max_length=self.context)
        return self.processor(text=text, images=images, **kwargs)


class ClipScorer:
    """Mean CLIP score (100 × cosine, floored at 0) of images against their captions."""

    def __init__(self, clip: CLIPModel, processor: CLIPProcessor, device: str | torch.device = "cpu"):
        self.processor = TruncatingProcessor(processor, clip.config.text_config.max_position_embeddings)
        model = PooledClip(clip.eval())
        self.metric = CLIPScore(model_name_or_path=lambda: (model, self.processor)).to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], batch_size: int = 64) -> float:
        """images: (N, 3, H, W) uint8."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.metric.reset()
        for start in range(0, len(captions), batch_size):
            self.metric.update(images[start:start + batch_size].to(self.device), captions[start:start + batch_size])
        return float(self.metric.compute())


def load_clip_score(name: str | None, device: str | torch.device = "cpu") -> tuple[ClipScorer | None, str | None]:
    """(scorer, None), or (None, a one-line notice) when no CLIP is configured or none can be loaded here."""
    if name is None:
        return None, "CLIP score skipped: eval.clip_model is null"
    try:
        clip, processor = CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        return None, (f"CLIP score skipped: no CLIP at {name!r} on this machine ({reason}); "
                      "set eval.clip_model to a local CLIP directory")
    return ClipScorer(clip, processor, device), None
