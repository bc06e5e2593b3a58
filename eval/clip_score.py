"""CLIP score (torchmetrics' CLIPScore) with any local CLIP checkpoint, under transformers 5.

torchmetrics calls `get_image_features` / `get_text_features` and expects tensors; in transformers 5 both
return an output object whose `pooler_output` holds the projected vector. `PooledClip` hands torchmetrics
that vector. Captions longer than the text tower's context are truncated by the tokenizer (keeping its
end-of-text token, which CLIP pools at) with a warning that counts them.

`eval.clip_model=trained` (the default) names the CLIP experiments.train_clip trained on the run's
dataset; it scores only if its summary vouches for its weights and it was trained on this very data
(the dataset key). Any other value is a hub id or a local CLIP directory. When none loads,
`load_clip_score` returns None and a one-line notice, and the score is left out of the report (never
estimated some other way). Every scorer carries a name saying which CLIP it is, which reports print
beside its numbers: scores of different CLIPs are not comparable.

    scorer, notice = load_clip_score("trained", data_root="data/scenes")   # or a hub id / directory
    scorer(images_uint8, captions) if scorer else print(notice)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.multimodal.clip_score import CLIPScore
from transformers import CLIPModel, CLIPProcessor

from mmdit_core.config import TRAINED_CLIP
from mmdit_core.data.shards import read_manifest
from mmdit_core.files import verified_summary

WEIGHTS = "model.safetensors"  # what CLIPModel.save_pretrained writes


def trained_clip_dir(data_root: str | Path) -> Path:
    """Where experiments.train_clip keeps the CLIP of a dataset: beside it, e.g. data/scenes_clip."""
    root = Path(data_root)
    return root.with_name(f"{root.name}_clip")


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
                warnings.warn(
                    f"CLIP score: {too_long} of {len(text)} captions exceed the model's {self.context} "
                    "tokens and are truncated",
                    stacklevel=2,
                )
            kwargs.update(truncation=True, max_length=self.context)
        return self.processor(text=text, images=images, **kwargs)


class ClipScorer:
    """Mean CLIP score of images against their captions (100 × cosine averaged, the mean floored at 0, as
    torchmetrics computes it), by the CLIP `name`."""

    def __init__(self, clip: CLIPModel, processor: CLIPProcessor, device: str | torch.device = "cpu", name: str = ""):
        self.processor = TruncatingProcessor(processor, clip.config.text_config.max_position_embeddings)
        self.model = PooledClip(clip.eval()).to(device)
        self.metric = CLIPScore(model_name_or_path=lambda: (self.model, self.processor)).to(device)
        self.device, self.name = torch.device(device), name

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: list[str], batch_size: int = 64) -> float:
        """images: (N, 3, H, W) uint8."""
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.metric.reset()
        for start in range(0, len(captions), batch_size):
            self.metric.update(images[start : start + batch_size].to(self.device), captions[start : start + batch_size])
        return float(self.metric.compute())

    def embed_images(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Unit-length projected features (N, D) of uint8 images (N, 3, H, W), prepared by the processor
        torchmetrics uses: 100 × the dot product with a caption's features is their cosine score."""

        def features(rows: slice) -> torch.Tensor:
            pixels = self.processor(images=list(images[rows]), return_tensors="pt")["pixel_values"]
            return self.model.get_image_features(pixels.to(self.device))

        return self._embed(len(images), batch_size, features)

    def embed_captions(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        """Unit-length projected features (N, D) of captions (truncated to the context, as in scoring)."""

        def features(rows: slice) -> torch.Tensor:
            text = self.processor(text=captions[rows], return_tensors="pt", padding=True)
            return self.model.get_text_features(
                text["input_ids"].to(self.device), text["attention_mask"].to(self.device)
            )

        return self._embed(len(captions), batch_size, features)

    @torch.no_grad()
    def _embed(self, n: int, batch_size: int, features) -> torch.Tensor:
        chunks = [features(slice(start, start + batch_size)) for start in range(0, n, batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=-1).cpu()


def load_clip_score(
    name: str | None, device: str | torch.device = "cpu", data_root: str | Path | None = None
) -> tuple[ClipScorer | None, str | None]:
    """(scorer, None), or (None, a one-line notice) when no CLIP is configured or none can be loaded here.
    `trained` needs `data_root`: the dataset whose CLIP it is."""
    if name is None:
        return None, "CLIP score skipped: eval.clip_model is null"
    label = name
    if name == TRAINED_CLIP:
        found, label = trained_clip(data_root)
        if found is None:
            return None, label
        name = str(found)
    try:
        clip, processor = CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except (OSError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        return None, (
            f"CLIP score skipped: no CLIP at {name!r} on this machine ({reason}); "
            "set eval.clip_model to a local CLIP directory"
        )
    return ClipScorer(clip, processor, device, label), None


def trained_clip(data_root: str | Path | None) -> tuple[Path | None, str]:
    """(directory, its name in reports) of the CLIP trained on this dataset, or (None, why there is none)."""
    if data_root is None:
        raise ValueError("eval.clip_model=trained needs the dataset whose CLIP it is (data_root)")
    path, dataset = trained_clip_dir(data_root), read_manifest(data_root)["key"]
    summary = verified_summary(path, WEIGHTS)
    train = "`python -m experiments.train_clip --config <the run's config>` trains one"
    if summary is None:
        return None, f"CLIP score skipped: no CLIP trained on {data_root} yet at {path} ({train})"
    if summary["made_from"]["dataset"] != dataset:
        return None, (
            f"CLIP score skipped: the CLIP at {path} was trained on other data (dataset "
            f"{summary['made_from']['dataset']}, this one is {dataset}); {train}"
        )
    return path, f"CLIP trained here on {data_root} (dataset {dataset}, weights {summary['weights_sha256'][:8]})"
