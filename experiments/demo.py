"""`make demo`: the whole pipeline on the built-in scenes (or any data.source), on this machine, tracked in MLflow.

    python -m experiments.demo [--config experiments/configs/demo.yaml] [--set k=v ...]

Prepares the scenes, trains the latent autoencoder and the CLIP that scores (or reuses each one made
from the same settings and data: the one in place, or a shipped one from experiments/autoencoders/ and
experiments/clips/), builds the latent cache (or reuses a fresh one), trains the MMDiT with Ray Train,
evaluates its final checkpoint (FID, KID, prompt adherence, CLIP score; eval.num_samples images at the
config's sampling settings, decoded by the frozen decoder), and prints the autoencoder's fidelity, the
CLIP's validation, where the samples are, the headline metrics and how to open the MLflow UI.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from eval.clip_validation import describe as describe_clip
from mmdit_core.config import TRAINED_CLIP

from . import cache_latents, evaluate, prepare_data, train, train_autoencoder, train_clip
from .cli import config_parser, resolve_config, run_command

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "demo.yaml"


def prepare_inputs(cfg, stage=lambda name, run: run()) -> tuple[dict | None, dict | None]:
    """What training and evaluation read, each made or reused: the shards, the trained autoencoder, the
    trained CLIP (their summaries, or None where the config uses another kind), the latent cache.
    `stage(name, run)` runs each step (the demo times them)."""
    stage("data", lambda: prepare_data.prepare(cfg))
    ae = (
        stage("autoencoder", lambda: train_autoencoder.reuse_or_train(cfg))
        if cfg.autoencoder.kind == "trained"
        else None
    )
    clip = stage("CLIP", lambda: train_clip.reuse_or_train(cfg)) if cfg.eval.clip_model == TRAINED_CLIP else None
    if cfg.data.latent_cache:
        stage("latent cache", lambda: cache_latents.reuse_or_build(cfg))
    return ae, clip


def main(argv=None) -> dict:
    cfg = resolve_config(config_parser(__doc__, str(DEFAULT_CONFIG)).parse_args(argv))
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, run):
        print(f"\n== {name} ==", flush=True)
        t0 = time.perf_counter()
        out = run()
        seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    ae, clip = prepare_inputs(cfg, stage)
    summary = stage("training (Ray Train)", lambda: train.fit(cfg))
    report = stage("evaluation", lambda: evaluate.evaluate(summary["checkpoint"]))
    summary["eval"] = {"report": f"{report['out']}/report.md", **report["points"][0]["metrics"]}
    seconds["total"] = round(time.perf_counter() - started, 1)
    summary["stage_seconds"] = seconds
    if ae is not None:
        summary["autoencoder"] = {
            "path": cfg.autoencoder.path,
            "fidelity": ae["fidelity"],
            "train_seconds": ae["train_seconds"],
        }
    if clip is not None:
        summary["clip"] = {
            "name": report["clip"],
            "validation": clip["validation"],
            "train_seconds": clip["train_seconds"],
        }
    run_dir = Path(summary["grid"]).parent.parent
    (run_dir / "demo.json").write_text(json.dumps(summary, indent=2))

    print("\n== done ==")
    print(f"samples for held-out captions: {summary['grid']}")
    print(f"denoising strip: {run_dir / 'trajectory.png'}   loss curve: {run_dir / 'loss.png'}")
    print(f"checkpoint: {summary.get('checkpoint')}")
    if ae is not None:
        print(f"autoencoder ({cfg.autoencoder.path}): {train_autoencoder.describe(ae)}")
    if clip is not None:
        print(f"CLIP ({train_clip.trained_clip_dir(cfg.data.root)}): {describe_clip(clip['validation'])}")
    print(
        f"val loss {summary['val_loss']:.4f}   train loss (last {cfg.train.log_every} steps) "
        f"{summary['train_loss_last']:.4f}   stages (s): {json.dumps(seconds)}"
    )
    print(f"training by phase (s): {json.dumps(summary.get('phase_seconds', {}))}")
    m = summary["eval"]
    line = f"eval on {int(m['num_samples'])} samples for held-out captions: FID {m['fid']:.1f}  KID {m['kid']:.4f}"
    if "adherence_colour" in m:  # the oracle scores the built-in scenes only
        line += (
            f"  adherence: colour {100 * m['adherence_colour']:.0f}%  position {100 * m['adherence_position']:.0f}%  "
            f"shape {100 * m['adherence_shape']:.0f}%  whole caption with shape {100 * m['adherence_whole_shape']:.0f}%"
        )
    if "clip_score" in m:
        line += f"  CLIP score {m['clip_score']:.1f}"
        if clip is not None:
            real = clip["validation"]["own_vs_shuffled"]
            line += (
                f" (real held-out images: {real['own']:.1f} with their captions, "
                f"{real['shuffled']:.1f} with shuffled ones)"
            )
    print(f"{line}  ({summary['eval']['report']})")
    links = summary.get("mlflow_links") or "no links: MLflow did not answer"
    print(f"MLflow run {summary['mlflow_run_id']} ({summary['status']}): {links}")
    return summary


if __name__ == "__main__":
    run_command(main)
