"""Scoring a checkpoint over a grid of sampling settings, without retraining (no tracking here: the
command experiments.evaluate logs what this computes to MLflow).

For every grid point, eval.num_samples images are sampled for the held-out captions (cycled when the
val split has fewer; the same noise at every grid point, so points are paired) and scored:

    FID, KID         against eval.reference_split (clean-fid protocol, cached reference statistics)
    CMMD             ×10³, the unbiased MMD² of the CLIP's image embeddings against the same reference images
    *_low, *_high    each one's 95% jackknife interval over the generated samples (eval.stats): its noise at N
    adherence_*      the exact oracle, per attribute and per whole caption, and binding on captions of two
                     or more objects (built-in scenes only)
    clip_score       torchmetrics CLIPScore by eval.clip_model: by default the CLIP trained on this dataset
                     (experiments.train_clip); skipped, with a notice, if none loads; reports name the CLIP
    val_loss, _t*    validation loss at the fixed times eval.val_t (does not depend on sampling)

Files in <run dir>/eval/step_<N>/ (or `out`): report.json, report.md, curves.png (FID and adherence
against CFG scale and against steps), grid_<setting>.png, and <setting>/images/*.png.
"""

from __future__ import annotations

import itertools
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from mmdit_core.autoencoder import Autoencoder
from mmdit_core.checkpoint import CheckpointError, load_checkpoint, read_config
from mmdit_core.config import ConfigError, ExperimentConfig, SampleConfig, build_config
from mmdit_core.data.images import to_uint8
from mmdit_core.data.scenes import Scene, scenes_of
from mmdit_core.data.training import read_split, validation_set
from mmdit_core.flow import RectifiedFlow, generate
from mmdit_core.machine import resolve_precision
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.timing import Phases
from mmdit_core.trainer import validation_loss

from .adherence import HEADLINE, score_batch
from .clip_score import load_clip_score
from .fid import (
    PROTOCOL,
    Inception,
    Statistics,
    fid,
    fid_interval,
    folder_features,
    kid,
    reference_statistics,
    setup_line,
)
from .figures import eval_curves, sample_grid
from .mmd import CMMD_SCALE, CMMD_SIGMA, gaussian_kernel, mmd_jackknife, polynomial_kernel
from .stats import JACKKNIFE_SEED, jackknife_interval

GRID_IMAGES = 16


class GridField(NamedTuple):
    """A SampleConfig field an evaluation grid can vary."""

    name: str  # how a value reads in a grid point's name
    label: str  # its column in reports
    flag: str  # the option of `python -m experiments.evaluate` that lists its values
    parse: Callable[[str], Any]


# The sampling settings an evaluation grid (and so a sweep's sampling axis) varies: a field added here is
# a grid field everywhere (names, reports, the command, eval runs' params and tags, sweeps' reports).
GRID = {
    "sampler": GridField("{}", "sampler", "--sampler", str),
    "steps": GridField("{}", "steps", "--steps", int),
    "cfg_scale": GridField("cfg{:g}", "CFG", "--cfg", float),
}


@dataclass(frozen=True)
class Setting:
    """One grid point: a value of every GRID field."""

    values: tuple[tuple[str, Any], ...]

    @property
    def name(self) -> str:
        return "-".join(GRID[field].name.format(value) for field, value in self.values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    @classmethod
    def of(cls, sample: SampleConfig) -> Setting:
        return cls(tuple((field, getattr(sample, field)) for field in GRID))

    def sample_config(self, base: SampleConfig) -> SampleConfig:
        """`base` with this point's settings, validated like any config value."""
        try:
            return SampleConfig.model_validate({**base.model_dump(), **self.as_dict()})
        except ValueError as exc:
            raise ConfigError(f"sampling setting {self.name}: {exc}") from None


def settings_grid(grid: dict[str, list[Any]], base: SampleConfig) -> list[Setting]:
    """Every combination of the listed values (a GRID field not listed keeps `base`'s value), each
    validated as a SampleConfig, so a bad grid is refused before any work."""
    unknown = set(grid) - set(GRID)
    if unknown:
        raise ConfigError(f"not a sampling grid field: {', '.join(sorted(unknown))} (grid fields: {', '.join(GRID)})")
    axes = [[(field, value) for value in grid.get(field) or [getattr(base, field)]] for field in GRID]
    settings = [Setting.of(Setting(tuple(point)).sample_config(base)) for point in itertools.product(*axes)]
    return settings


def scenes_for(cfg: ExperimentConfig, attributes: list[dict | None]) -> tuple[list[Scene] | None, str | None]:
    """The scenes the oracle judges against, or None and why adherence cannot be scored here."""
    scenes = scenes_of(attributes)
    if scenes is None:
        return None, f"adherence skipped: {cfg.data.root} holds no built-in scenes to judge against"
    if any(s.background != "plain" for s in scenes):
        return None, "adherence skipped: the oracle judges scenes on the plain background only"
    return scenes, None


class Evaluator:
    """What scoring any weights of one config needs: held-out captions and scenes, fixed noise, reference
    statistics, Inception and CLIP. Built once, then `run` per grid point (or per step during training)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        autoencoder: Autoencoder,
        encoder: TextEncoder,
        device: str | torch.device,
        num_samples: int,
        verbose: bool = True,
    ):
        self.cfg, self.autoencoder, self.device = cfg, autoencoder, torch.device(device)
        self.num_samples, self.verbose = num_samples, verbose
        self.precision = resolve_precision(cfg.eval.precision, self.device)  # of the Inception features
        setup = Phases()  # what building it cost, before any grid point
        pixels, captions, attributes = read_split(cfg.data.root, "val", num_samples, cfg.data.seed)
        repeats = -(-num_samples // len(captions))
        self.captions = (captions * repeats)[:num_samples]
        self.scenes, adherence_notice = scenes_for(cfg, (attributes * repeats)[:num_samples])
        # the oracle on the real held-out images at this resolution: the ceiling a model's adherence is read against
        real = score_batch(pixels, self.scenes[: len(pixels)]) if self.scenes is not None else None
        self.oracle = {**real.fractions(), "objects": real.objects, "images": real.images} if real else None
        self.cond, self.null = encoder.encode(self.captions), encoder.null()
        self.side = cfg.eval.image_size or cfg.data.image_size  # another side than the data's: resolution transfer
        latent_shape = autoencoder.encode(torch.zeros(1, 3, self.side, self.side, device=self.device)).shape[1:]
        self.noise = torch.randn((num_samples, *latent_shape), generator=torch.Generator().manual_seed(cfg.sample.seed))
        self.inception = Inception(self.device, self.precision)
        with setup("reference_statistics"):
            self.reference, self.reference_key = reference_statistics(cfg, self.inception, num_samples, verbose)
        with setup("real_vs_real"):
            self.floor = self._real_vs_real(verbose)
        with setup("clip_load"):
            self.clip, clip_notice = load_clip_score(cfg.eval.clip_model, self.device, cfg.data.root)
        with setup("cmmd_reference"):
            self.clip_reference = self._clip_reference() if self.clip else None
        self.setup_seconds = setup.as_metrics("")
        self.notices = [n for n in (adherence_notice, clip_notice) if n]
        for notice in self.notices:
            print(notice)

    @property
    def clip_name(self) -> str | None:
        """Which CLIP scores (None: none loaded)."""
        return self.clip.name if self.clip else None

    @property
    def setup(self) -> dict[str, Any]:
        """What every FID, KID and CMMD of this evaluator is computed from, apart from each point's sampling
        settings: two of them are differenced only where this is equal."""
        ref = self.reference_key
        return {
            "num_samples": self.num_samples,
            "reference_split": ref["split"],
            "reference_images": ref["images"],
            "reference_data": ref["data"],
            "reference_seed": ref["sample_seed"],
            "protocol": f"clean-fid {PROTOCOL}: PIL bicubic to 299x299",
            "inception": ref["extractor"],
            "precision": self.precision,
            "batch_size": self.cfg.eval.batch_size,
            "statistics": "float64",
            "image_size": self.side,
            "weights": self.cfg.eval.weights,
            "jackknife": f"{min(self.num_samples, self.cfg.eval.jackknife_groups)} groups, seed {JACKKNIFE_SEED}",
            # CMMD's CLIP is the CLIP score's, named by `clip` (a tag of eval runs: scoring again with another
            # CLIP updates the same runs), so it is not part of the setup
            "cmmd": f"RBF sigma {CMMD_SIGMA:g}, x{CMMD_SCALE:g}, unbiased",
        }

    def _clip_reference(self) -> np.ndarray:
        """CLIP image embeddings (N, D) of the FID reference's images (the same seeded sample of its split)."""
        key = self.reference_key
        pixels, _, _ = read_split(self.cfg.data.root, key["split"], key["images"], key["sample_seed"])
        images = torch.from_numpy(to_uint8(pixels)).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        return self.clip.embed_images(images).double().numpy()

    def _real_vs_real(self, verbose: bool) -> dict[str, Any]:
        """FID and KID of real images of another split against the reference at the same N: what a perfect
        model would score at this N (FID's small-sample bias made visible)."""
        split = "val" if self.cfg.eval.reference_split != "val" else "train"
        real, _ = reference_statistics(self.cfg, self.inception, self.num_samples, verbose, split=split)
        return {
            "split": split,
            "images": real.count,
            "fid": fid(real, self.reference),
            "kid": kid(real, self.reference),
        }

    @torch.no_grad()
    def sample(
        self, model: torch.nn.Module, flow: RectifiedFlow, setting: Setting, directory: Path, phases: Phases
    ) -> tuple[np.ndarray, float]:
        """(N, H, W, 3) uint8 samples, also written to `directory` as PNG files; and images per second
        (sampling and decoding, both in fp32)."""
        sample_cfg, batch = setting.sample_config(self.cfg.sample), self.cfg.eval.batch_size
        model.eval()
        chunks, started = [], time.perf_counter()
        for start in tqdm(range(0, self.num_samples, batch), desc=f"sampling {setting.name}", disable=not self.verbose):
            rows = slice(start, start + batch)
            with phases("sampling"):
                latents = generate(
                    model,
                    flow,
                    self.noise[rows].to(self.device),
                    self.cond[rows].to(self.device),
                    self.null.to(self.device),
                    sample_cfg,
                )
            with phases("decoding"):
                chunks.append(to_uint8(self.autoencoder.decode(latents)))
        img_per_s = self.num_samples / (time.perf_counter() - started)
        with phases("writing"):
            images = np.concatenate(chunks)
            shutil.rmtree(directory, ignore_errors=True)  # an earlier, larger evaluation must not leave files
            directory.mkdir(parents=True)
            for i, image in enumerate(images):
                Image.fromarray(image).save(directory / f"{i:06d}.png")
        return images, img_per_s

    def run(self, model: torch.nn.Module, flow: RectifiedFlow, setting: Setting, directory: Path) -> dict[str, float]:
        """Sample, then FID, KID, adherence and CLIP score of one setting; a sample grid in `directory`. The
        metrics include the wall seconds of each phase (seconds_sampling, seconds_inception, ...)."""
        phases = Phases()
        images, img_per_s = self.sample(model, flow, setting, directory / setting.name / "images", phases)
        with phases("inception"):  # reading and resizing (clean-fid) included
            generated = Statistics(
                folder_features(
                    directory / setting.name / "images",
                    self.inception,
                    self.cfg.eval.batch_size,
                    self.cfg.eval.num_workers,
                    f"Inception {setting.name}",
                    self.verbose,
                )
            )
        groups = self.cfg.eval.jackknife_groups
        with phases("fid_kid"):
            metrics = {"fid": fid(generated, self.reference), "kid": kid(generated, self.reference)}
            metrics["fid_low"], metrics["fid_high"] = fid_interval(generated, self.reference, groups)
            kid_held_out = mmd_jackknife(generated.features, self.reference.features, polynomial_kernel, groups)[1]
            metrics["kid_low"], metrics["kid_high"] = jackknife_interval(metrics["kid"], kid_held_out)
        metrics |= {"num_samples": float(self.num_samples), "sample_img_per_s": img_per_s}
        if self.scenes is not None:
            with phases("oracle"):
                adherence = score_batch(images, self.scenes).fractions()
            metrics.update({f"adherence_{k}": v for k, v in adherence.items()})
        chw = torch.from_numpy(images).permute(0, 3, 1, 2)  # (N, 3, H, W) uint8
        if self.clip is not None:
            with phases("clip"):
                metrics["clip_score"] = self.clip(chw, self.captions, self.cfg.eval.batch_size)
            with phases("cmmd"):
                embedded = self.clip.embed_images(chw).double().numpy()
                value, held_out = mmd_jackknife(embedded, self.clip_reference, gaussian_kernel, groups)
                low, high = jackknife_interval(value, held_out)
                metrics |= {"cmmd": CMMD_SCALE * value, "cmmd_low": CMMD_SCALE * low, "cmmd_high": CMMD_SCALE * high}
        with phases("grid"):
            sample_grid(chw[:GRID_IMAGES].float() / 127.5 - 1, self.captions[:GRID_IMAGES]).save(
                directory / f"grid_{setting.name}.png"
            )
        return metrics | phases.as_metrics()


# ---- one checkpoint -------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest checkpoint of a run directory."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    found = sorted(p for p in path.glob("checkpoint_*") if (p / "manifest.json").is_file())
    if not found:
        raise CheckpointError(
            f"{path} is neither a checkpoint (no manifest.json) nor a run directory with checkpoint_* in it"
        )
    return found[-1]


def _with_interval(m: dict[str, float], name: str, scale: float = 1.0) -> str:
    value = f"{scale * m[name]:.2f}"
    return f"{value} [{scale * m[name + '_low']:.2f}, {scale * m[name + '_high']:.2f}]" if name + "_low" in m else value


def markdown(report: dict[str, Any]) -> str:
    setup, ref = report["setup"], report["reference"]
    n = setup["num_samples"]
    lines = [
        f"# Evaluation of {report['checkpoint']}",
        "",
        f"Step {report['step']}, {setup['weights']} weights. FID and KID: {n} generated images per row against "
        f"{ref['images']} images of the {ref['split']} split (clean-fid protocol, Inception-v3 pool features); "
        "CMMD ×10³: the same images' CLIP embeddings. In brackets: the 95% jackknife interval over the generated "
        f"samples, the noise of one run at this N. FID is biased upward at small N: compare rows with the same "
        f"setup only. Real images of the {report['real_vs_real']['split']} split score FID "
        f"{report['real_vs_real']['fid']:.2f}, KID ×10³ {1e3 * report['real_vs_real']['kid']:.2f} "
        f"(N={report['real_vs_real']['images']}): the floor at this N.",
        "",
        setup_line(setup),
        "Sampled with (besides the columns): shift {shift:g}, noise seed {seed}.".format(
            **report["points"][0]["sampling"]
        ),
        *(
            [
                f"Sampled at {report['transfer_size']}×{report['transfer_size']}, another side than the data's "
                f"(resolution transfer, {report['transfer']}); FID and KID compare them with the data's images at "
                "Inception's 299×299."
            ]
            if report["transfer_size"]
            else []
        ),
        "",
    ]
    header = [field.label for field in GRID.values()] + [f"FID (N={n})", "KID ×10³"]
    has_adherence = "adherence_whole" in report["points"][0]["metrics"]
    has_clip = "clip_score" in report["points"][0]["metrics"]
    header += ["CMMD ×10³"] if has_clip else []
    header += ["colour", "position", "shape", "whole caption"] if has_adherence else []
    header += ["CLIP score"] if has_clip else []
    header += ["img/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for point in report["points"]:
        m = point["metrics"]
        row = [f"{point[field]:g}" if isinstance(point[field], float) else str(point[field]) for field in GRID]
        row += [_with_interval(m, "fid"), _with_interval(m, "kid", 1e3)]
        row += [_with_interval(m, "cmmd")] if has_clip else []
        row += [f"{100 * m[f'adherence_{k}']:.1f}%" for k in HEADLINE] if has_adherence else []
        row += [f"{m['clip_score']:.2f}"] if has_clip else []
        row += [f"{m['sample_img_per_s']:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    if report["clip"]:
        lines += ["", f"CLIP score by: {report['clip']}."]
    oracle = report["oracle_on_real_images"]
    if oracle:
        lines += [
            "",
            f"The oracle on {oracle['images']} real held-out images at this resolution (its ceiling): "
            + ", ".join(f"{k} {100 * oracle[k]:.1f}%" for k in HEADLINE),
        ]
    val = report["val_loss_by_t"]
    lines += [
        "",
        f"Validation loss (mean over t): {report['val_loss']:.4f}; by t: "
        + ", ".join(f"t={float(t):.3f}: {v:.4f}" for t, v in val.items()),
        "",
    ]
    phases = {"setup": sum(report["setup_seconds"].values())}
    for point in report["points"]:
        for name, seconds in point["metrics"].items():
            if name.startswith("seconds_"):
                phases[name.removeprefix("seconds_")] = phases.get(name.removeprefix("seconds_"), 0.0) + seconds
    lines += ["Wall time by phase (s): " + ", ".join(f"{k} {v:.1f}" for k, v in phases.items()), ""]
    lines += [f"- {notice}" for notice in report["notices"]]
    return "\n".join(lines) + "\n"


def checkpoint_val_loss(
    cfg: ExperimentConfig, model: torch.nn.Module, flow: RectifiedFlow, autoencoder: Autoencoder, encoder: TextEncoder
) -> dict[float, float]:
    """The validation loss by t, as training measures it (the same held-out samples, noise and precision)."""
    x0, cond, _ = validation_set(cfg, autoencoder, encoder, cfg.eval.val_loss_samples)
    return validation_loss(model, flow, x0, cond, cfg)


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    grid: dict[str, list[Any]] | None = None,
    overrides: list[str] | None = None,
    out: str | Path | None = None,
    device: str | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Score one checkpoint at every point of `grid` (GRID field -> values; each defaults to the
    checkpoint's own sample setting); write the report files; return the report (with `trained`, the config the
    checkpoint was trained with, which names its MLflow run)."""
    path = resolve_checkpoint(checkpoint)
    trained = read_config(path)
    cfg = build_config(trained.to_dict(), overrides)
    device = torch.device(device or ("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu"))
    settings = settings_grid(grid or {}, cfg.sample)
    model = MMDiT(cfg.model)
    step = load_checkpoint(path, model=model, weights=cfg.eval.weights).step
    model.to(device).eval()
    model.positions.scaling = cfg.sample.rope_scaling  # read only on another grid than the trained one
    out = Path(out) if out else path.parent / "eval" / "_".join(filter(None, (f"step_{step:06d}", cfg.transfer)))
    out.mkdir(parents=True, exist_ok=True)
    autoencoder = Autoencoder.load(cfg.autoencoder).to(device)
    encoder = TextEncoder(cfg.text, device)
    flow = RectifiedFlow(cfg.flow, decode=autoencoder.decode)
    val = checkpoint_val_loss(cfg, model, flow, autoencoder, encoder)
    evaluator = Evaluator(cfg, autoencoder, encoder, device, cfg.eval.num_samples, verbose)
    points = []
    for setting in settings:
        metrics = evaluator.run(model, flow, setting, out)
        sampling = setting.sample_config(cfg.sample).model_dump()  # sampler, steps, CFG, shift, noise seed
        points.append({"name": setting.name, **setting.as_dict(), "sampling": sampling, "metrics": metrics})
        print(f"{setting.name}: " + "  ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)
    report = {
        "checkpoint": str(path),
        "step": step,
        "setup": evaluator.setup,  # what every FID, KID and CMMD here was computed from (but sampling)
        "transfer_size": cfg.eval.image_size,  # sampled at another side than the data's (None: the data's)
        "transfer": cfg.transfer,  # its name, with the rope scaling ('' at the data's side)
        "reference": evaluator.reference_key,
        "real_vs_real": evaluator.floor,
        "oracle_on_real_images": evaluator.oracle,
        "val_loss": sum(val.values()) / len(val),
        "val_loss_by_t": {f"{t:.3f}": v for t, v in val.items()},
        "points": points,
        "clip": evaluator.clip_name,
        "setup_seconds": evaluator.setup_seconds,
        "notices": evaluator.notices,
        "out": str(out),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    eval_curves(points, out / "curves.png")
    return report | {"trained": trained}
