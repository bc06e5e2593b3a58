"""The ablation axes: what each one tests, where the idea comes from, and the config overrides of its arms.

A training-time axis changes the trained model, so each of its arms (× seed) is a training run. A
sampling-time axis changes only how a trained checkpoint is sampled or which of its weights are
used, so every trained checkpoint is evaluated at each of its arms and nothing is retrained.

    AXES["pos_emb"].overrides("none")   # ["model.pos_emb=none"]

Any config field is an axis too (`--axis model.width=128,64,256`): its arms are the values given, the
first the reference; it is sampling-time where eval.evaluator.GRID samples with it, else training-time.
A sweep keeps such an axis's values reference first, so (name, arms) is all it takes to rebuild it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from eval.evaluator import GRID

HAND_BUILT = "the hand-built MMDiT write-up"


@dataclass(frozen=True)
class Axis:
    name: str
    kind: Literal["training", "sampling"]
    field: str  # the dotted config field the arms set
    arms: tuple[str, ...]  # values of `field`, as --set would write them
    reference: str  # the arm the others are compared with
    tests: str
    source: str
    redefines_loss: bool = False  # its arms train on different losses: their val losses are not compared

    def __post_init__(self):
        if self.reference not in self.arms:
            raise ValueError(f"axis {self.name}: reference arm {self.reference!r} is not one of {self.arms}")

    def overrides(self, arm: str) -> list[str]:
        if arm not in self.arms:
            raise KeyError(f"axis {self.name} has no arm {arm!r} (arms: {', '.join(self.arms)})")
        return [f"{self.field}={arm}"]


AXES: dict[str, Axis] = {
    axis.name: axis
    for axis in (
        Axis(
            "sdpa_layout",
            "training",
            "model.sdpa_layout",
            ("heads_first", "seq_first"),
            "heads_first",
            "SDPA handed (B, S, H, D) instead of (B, H, S, D): every token attends across its own heads only",
            f"{HAND_BUILT}: the head-axis bug that silently trained a worse model",
        ),
        Axis(
            "pos_emb",
            "training",
            "model.pos_emb",
            ("learned", "sincos", "rope2d", "msrope", "none"),
            "learned",
            "how tokens know where they are: learned table, fixed 2-D sin-cos, 2-D RoPE on image tokens, "
            "MSRoPE (image and text in one rotary frame), or nothing",
            f"{HAND_BUILT} (leaving them out was a disaster); DiT (sin-cos); Flux (RoPE); Qwen-Image (MSRoPE)",
        ),
        Axis(
            "loss_space",
            "training",
            "flow.loss_space",
            ("latent", "image"),
            "latent",
            "MSE on the network's target in latent space, or between decoded predicted and true x0 in pixels",
            f"{HAND_BUILT}: computing the loss in latent rather than image space",
            redefines_loss=True,
        ),
        Axis(
            "text_padding",
            "training",
            "model.text_padding",
            ("masked", "attended"),
            "masked",
            "the caption's padding tokens masked out of joint attention, or attended as keys (a silent bug)",
            "SD3 and Flux mask or drop padding; attending to it is a common mistake in hand-written joint attention",
        ),
        Axis(
            "timestep_input",
            "training",
            "model.timestep_input",
            ("1000t", "t"),
            "1000t",
            "the timestep embedding's sinusoids fed 1000·t (SD3, DiT's integer steps) or t in [0, 1] (a silent bug)",
            "SD3's and DiT's timestep embedding; the DDPM → rectified-flow port that forgets the factor",
        ),
        Axis(
            "null_text",
            "training",
            "flow.null_text",
            ("empty_caption", "zeros"),
            "empty_caption",
            "what training drops captions to for guidance: the empty caption sampling uses, or zeros (a silent bug)",
            "classifier-free guidance (Ho & Salimans): training's and sampling's null condition must be one",
        ),
        Axis(
            "latent_norm",
            "training",
            "autoencoder.latent_norm",
            ("scale_shift", "none"),
            "scale_shift",
            "latents normalised by the autoencoder's shift and scaling factor, or fed raw (a silent bug): the data "
            "no longer has the unit scale of the noise it is interpolated with",
            "SD3's (z - shift) · scale; the forgotten 0.18215 of Stable Diffusion ports",
            redefines_loss=True,  # the loss is measured on latents of another scale
        ),
        Axis(
            "cfg_scale",
            "sampling",
            "sample.cfg_scale",
            ("1.0", "2.0", "4.0", "7.0"),
            "1.0",
            "classifier-free guidance scale (1: no guidance)",
            "Ho & Salimans, classifier-free guidance; SD3",
        ),
        Axis(
            "time_sampling",
            "training",
            "flow.time_sampling",
            ("uniform", "logit_normal", "mode"),
            "uniform",
            "the training distribution of t",
            "SD3 (Esser et al. 2024), section 3.1",
        ),
        Axis(
            "prediction",
            "training",
            "flow.prediction",
            ("velocity", "epsilon", "x0"),
            "velocity",
            "what the network outputs (all converted to a velocity to sample)",
            "SD3's loss table; DDPM (epsilon)",
            redefines_loss=True,
        ),
        Axis(
            "time_cond",
            "training",
            "model.time_cond",
            ("adaln_zero", "additive"),
            "adaln_zero",
            "AdaLN-Zero modulation vs adding the conditioning vector to every token",
            "DiT (Peebles & Xie 2023)",
        ),
        Axis(
            "block",
            "training",
            "model.block",
            ("joint", "cross", "adaln_only"),
            "joint",
            "joint attention over [image, text], self- then cross-attention, or text through the pooled vector only",
            "SD3 (joint), PixArt-alpha (cross), DiT (adaLN only)",
        ),
        Axis(
            "qk_norm",
            "training",
            "model.qk_norm",
            ("none", "layernorm", "rmsnorm"),
            "none",
            "per-head normalisation of queries and keys",
            "SD3 (RMSNorm for stability at scale); ViT-22B",
        ),
        Axis(
            "ema",
            "sampling",
            "eval.weights",
            ("ema", "model"),
            "ema",
            "sampling with the exponential moving average of the weights or the raw weights",
            "DiT, SD3, most diffusion work",
        ),
        Axis(
            "steps",
            "sampling",
            "sample.steps",
            ("4", "8", "25"),
            "25",
            "number of ODE solver steps",
            "rectified flow's straight paths (Liu et al. 2022; SD3)",
        ),
        Axis(
            "sampler",
            "sampling",
            "sample.sampler",
            ("euler", "heun"),
            "euler",
            "first-order Euler or second-order Heun ODE solver",
            "EDM (Karras et al. 2022)",
        ),
    )
}


def field_axis(field: str, values: Sequence[str]) -> Axis:
    """The axis over config `field` at `values`, the first the reference."""
    values = tuple(str(v) for v in values)
    if len(values) < 2 or len(set(values)) < len(values):
        raise KeyError(f"axis {field}: give two or more different values, the reference first ({field}=V1,V2,...)")
    sampling = field.startswith("sample.") and field.removeprefix("sample.") in GRID
    return Axis(
        field,
        "sampling" if sampling else "training",
        field,
        values,
        values[0],
        f"{field} at {', '.join(values)}",
        "a config field (--axis)",
    )


def get_axis(name: str, arms: Sequence[str] | None = None) -> Axis:
    """A named axis, or, for a dotted name, the axis over that config field at `arms` (reference first)."""
    if name in AXES:
        return AXES[name]
    if "." in name:
        return field_axis(name, arms or ())
    raise KeyError(f"unknown axis {name!r} (axes: {', '.join(AXES)}; or any config field: --axis FIELD=V1,V2,...)")


def references(axes: dict[str, Sequence[str]]) -> dict[str, str]:
    """Each axis's reference arm."""
    return {name: get_axis(name, arms).reference for name, arms in axes.items()}
