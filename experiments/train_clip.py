"""Train the CLIP that scores samples: a small transformers CLIPModel on the dataset's train split.

    python -m experiments.train_clip --config C [--set clip.train_steps=3000 ...] [--reuse | --revalidate]

No pretrained CLIP can be downloaded here, so the CLIP score's judge is trained on the data it judges,
like the latent autoencoder: a word-piece tokenizer learned from the train captions (`tokenizers`),
a vision and a text transformer (clip.width, clip.depth) and the symmetric contrastive loss of CLIP.
Images reach it through the CLIPProcessor saved with it, in training as in scoring (pixels mapped to
[-1, 1], as everywhere in this project). It is then validated on the val split, never seen in
training (eval/clip_validation.py: retrieval, own vs shuffled captions, one-attribute swaps).

<data.root>_clip (e.g. data/scenes_clip) receives, all at once or not at all, the weights and the
processor (save_pretrained: `CLIPModel.from_pretrained(dir)` and `CLIPProcessor.from_pretrained(dir)`
load offline) and summary.json (settings, what it was made from, validation, time). The run is
tracked in MLflow (experiment `clip`). eval.clip_model=trained (the default) scores with it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tqdm import tqdm
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, PreTrainedTokenizerFast

from eval.clip_score import WEIGHTS, ClipScorer, trained_clip_dir
from eval.clip_validation import describe, validate
from mmdit_core.config import ClipConfig, ExperimentConfig, flatten
from mmdit_core.data.images import to_uint8
from mmdit_core.data.scenes import scenes_of
from mmdit_core.data.shards import SkipCounts, make_loader, read_manifest, split_shards
from mmdit_core.data.training import read_split
from mmdit_core.errors import InputError
from mmdit_core.files import verified_summary

from .cli import run_command
from .stage import Stage, descend, train_images
from .tracking import Tracker

# CLIPs this command trained are committed in experiments/clips with their summaries and reused when
# made from the same settings and data (`python -m experiments.train_clip --config C` reproduces each one).
STAGE = Stage("CLIP", weights=WEIGHTS, shipped=Path(__file__).parent / "clips", measured="validation")
LOG_EVERY = 50  # training steps between logged losses
VALIDATION_IMAGES = 1024  # val images the validation uses (all of a smaller split)
SPECIAL = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")


def train_tokenizer(captions: list[str], vocab_size: int, context_length: int) -> PreTrainedTokenizerFast:
    """Word pieces of the captions, lower-cased; every encoding is [BOS] ... [EOS] (CLIP pools at [EOS])."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        captions, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL))
    )
    bos, eos = (tokenizer.token_to_id(t) for t in ("[BOS]", "[EOS]"))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", bos), ("[EOS]", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        model_max_length=context_length,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
    )


def build_clip(
    clip_cfg: ClipConfig, image_size: int, tokenizer: PreTrainedTokenizerFast
) -> tuple[CLIPModel, CLIPProcessor]:
    """A CLIPModel of this shape and the processor it is trained and scored through."""
    tower = {
        "hidden_size": clip_cfg.width,
        "intermediate_size": 4 * clip_cfg.width,
        "num_hidden_layers": clip_cfg.depth,
        "num_attention_heads": clip_cfg.num_heads,
    }
    config = CLIPConfig(
        text_config={
            **tower,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": clip_cfg.context_length,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        },
        vision_config={**tower, "image_size": image_size, "patch_size": clip_cfg.patch_size},
        projection_dim=clip_cfg.width,
    )
    # uint8 -> [-1, 1]; resizing and cropping are identities at the dataset's size and fit any other size to it
    images = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return CLIPModel(config), CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def made_from(cfg: ExperimentConfig) -> dict[str, Any]:
    """What determines the trained CLIP: its settings, the data (its images' size included), the seed."""
    return {"clip": cfg.clip.model_dump(), "dataset": read_manifest(cfg.data.root)["key"], "seed": cfg.train.seed}


def train_captions(cfg: ExperimentConfig) -> list[str]:
    """Every caption of the train split, in shard order."""
    captions: list[str] = []
    for batch in make_loader(
        split_shards(cfg.data.root, "train"), 256, counts=SkipCounts(), image_size=cfg.data.image_size
    ):
        captions += batch["caption"]
    return captions


def device_of(cfg: ExperimentConfig) -> torch.device:
    return torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")


def train(cfg: ExperimentConfig, tracker: Tracker) -> tuple[CLIPModel, CLIPProcessor, dict[str, Any]]:
    """The trained CLIP, its processor, and what training measured."""
    clip_cfg = cfg.clip
    torch.manual_seed(cfg.train.seed)
    tokenizer = train_tokenizer(train_captions(cfg), clip_cfg.vocab_size, clip_cfg.context_length)
    clip, processor = build_clip(clip_cfg, cfg.data.image_size, tokenizer)
    clip.to(device_of(cfg))
    counts = SkipCounts()
    loader = train_images(cfg, clip_cfg.batch_size, counts)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=clip_cfg.lr, weight_decay=clip_cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, clip_cfg.train_steps)
    started, batches = time.perf_counter(), iter(loader)
    for step in (bar := tqdm(range(1, clip_cfg.train_steps + 1), desc="CLIP", unit="step")):
        batch = next(batches)
        inputs = processor(
            text=batch["caption"],
            images=list(to_uint8(batch["image"])),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=clip_cfg.context_length,
        ).to(clip.device)
        loss = clip(**inputs, return_loss=True).loss
        descend(loss, optimizer, schedule)
        if step % LOG_EVERY == 0 or step == clip_cfg.train_steps:
            tracker.log_metrics({"train/loss": loss.item(), "train/logit_scale": clip.logit_scale.exp().item()}, step)
            bar.set_postfix(loss=f"{loss.item():.3f}")
    clip.eval()
    return (
        clip,
        processor,
        {
            "train_seconds": round(time.perf_counter() - started, 1),
            "steps": clip_cfg.train_steps,
            "params": sum(p.numel() for p in clip.parameters()),
            "vocab": len(tokenizer),
            "train_skips": counts.totals(),
        },
    )


def validation(cfg: ExperimentConfig, scorer: ClipScorer) -> dict[str, Any]:
    """eval/clip_validation.py on a seeded sample of VALIDATION_IMAGES val images (all of a smaller split)."""
    pixels, captions, attributes = read_split(cfg.data.root, "val", VALIDATION_IMAGES, cfg.data.seed)
    # attribute swaps need only the captions' attributes (the oracle's plain-background rule does not apply)
    scenes = scenes_of(attributes)
    images = torch.from_numpy(to_uint8(pixels)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
    return validate(scorer, images, captions, scenes, seed=cfg.data.seed)


def validation_metrics(measured: dict[str, Any]) -> dict[str, float]:
    """The validation as MLflow metrics: val/retrieval_image_to_text, val/gap_shuffled, val/separation_colour, ..."""
    metrics = {f"val/retrieval_{k}": v for k, v in measured["retrieval"].items()}
    metrics |= {
        "val/clip_score_own": measured["own_vs_shuffled"]["own"],
        "val/clip_score_shuffled": measured["own_vs_shuffled"]["shuffled"],
        "val/gap_shuffled": measured["own_vs_shuffled"]["gap"]["mean"],
    }
    swaps = measured.get("attribute_swaps", {}) | ({"binding": measured["binding"]} if "binding" in measured else {})
    for name, swap in swaps.items():
        metrics |= {f"val/separation_{name}": swap["separation"], f"val/gap_{name}": swap["gap"]["mean"]}
    return metrics


def train_and_save(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Train, validate and save the CLIP of `cfg`'s dataset, tracked in MLflow."""
    made, out = made_from(cfg), trained_clip_dir(cfg.data.root)
    params = {f"clip.{k}": v for k, v in flatten(made["clip"]).items()} | {
        "dataset": made["dataset"],
        "seed": made["seed"],
    }
    with STAGE.tracked(made, out, params, tracking_uri, cfg) as tracker:
        clip, processor, trained = train(cfg, tracker)
        summary = {**trained, "made_from": made}
        STAGE.save(out, summary, lambda tmp: (clip.save_pretrained(tmp), processor.save_pretrained(tmp)))
        return validate_saved(cfg, out, summary, ClipScorer(clip, processor, clip.device), tracker)


def validate_saved(
    cfg: ExperimentConfig, out: Path, summary: dict[str, Any], scorer: ClipScorer, tracker: Tracker
) -> dict[str, Any]:
    """The saved CLIP's validation, written into its summary and logged to its run."""
    summary["validation"] = validation(cfg, scorer)
    STAGE.rewrite_summary(out, summary)
    tracker.log_metrics(validation_metrics(summary["validation"]), cfg.clip.train_steps)
    tracker.log_artifact(out / "summary.json")
    return summary


def revalidate(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """Measure the CLIP beside the dataset again with this code's validation (its weights untouched and
    checked first) and rewrite its summary; logged to the run that trained it."""
    out = trained_clip_dir(cfg.data.root)
    summary = verified_summary(out, WEIGHTS)
    if summary is None or summary["made_from"] != made_from(cfg):
        raise InputError(f"no CLIP made from these settings and this data at {out} (train it first)")
    with STAGE.tracked(summary["made_from"], out, {}, tracking_uri, cfg) as tracker:
        scorer = ClipScorer(CLIPModel.from_pretrained(out), CLIPProcessor.from_pretrained(out), device_of(cfg))
        return validate_saved(cfg, out, summary, scorer, tracker)


def reuse_or_train(cfg: ExperimentConfig, tracking_uri: str | None = None) -> dict[str, Any]:
    """The CLIP trained from these settings on this data: the one beside the dataset, else a shipped one
    copied there, else a new one trained."""
    return STAGE.reuse_or_train(
        made_from(cfg),
        trained_clip_dir(cfg.data.root),
        lambda: train_and_save(cfg, tracking_uri),
        lambda summary: describe(summary["validation"]),
        lambda: revalidate(cfg, tracking_uri),
    )


def main(argv=None) -> dict[str, Any]:
    return STAGE.main(
        __doc__,
        argv,
        train_and_save,
        reuse_or_train,
        lambda cfg, summary: f"CLIP saved to {trained_clip_dir(cfg.data.root)}: {describe(summary['validation'])}",
        revalidate,
    )


if __name__ == "__main__":
    run_command(main)
