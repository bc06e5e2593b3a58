"""What a sweep consists of: its training trials (training-time arms × seeds) and the sampling-time
arms every trained checkpoint is evaluated at.

Axes combine one at a time by default: the reference run (every axis at its reference arm) plus one
run per other arm of each axis, so an axis's effect is read against the same reference. A preset may
ask for the full product of its training axes instead (`combine: product`).

    plan = load_preset("critical_details")           # ablations/presets/critical_details.yaml
    for trial in plan.trials(): trial.overrides()     # every training axis's arm, then "train.seed=N"
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from mmdit_core.errors import InputError, MissingInput

from .allocation import SeedRule
from .axes import Axis, get_axis

PRESETS = Path(__file__).parent / "presets"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Trial:
    """One training run of a sweep: the arm of every training-time axis of the sweep, and its seed.
    Reference arms are set explicitly too: the base config need not sit at them. Made by SweepPlan.trial."""

    arms: tuple[tuple[str, str], ...]  # ((axis name, arm), ...) for every training-time axis
    seed: int
    axes: tuple[Axis, ...]  # the axis of each arm

    @property
    def moved(self) -> tuple[tuple[str, str], ...]:
        """The arms off the reference."""
        return tuple((name, arm) for axis, (name, arm) in zip(self.axes, self.arms) if arm != axis.reference)

    @property
    def name(self) -> str:
        moved = ",".join(f"{axis}={arm}" for axis, arm in self.moved) or "reference"
        return f"{moved}-s{self.seed}"

    def overrides(self) -> list[str]:
        return [o for axis, (_, arm) in zip(self.axes, self.arms) for o in axis.overrides(arm)] + [
            f"train.seed={self.seed}"
        ]


@dataclass(frozen=True)
class SweepPlan:
    name: str
    config: str  # the base experiment config (YAML path)
    axes: dict[str, tuple[str, ...]]  # axis name -> the arms swept (the reference among them; a field axis's first)
    seeds: int  # per arm; with max_seeds, the first round's (--seeds auto)
    overrides: tuple[str, ...] = ()  # --set overrides on the base config, for every trial
    combine: Literal["one_at_a_time", "product"] = "one_at_a_time"
    description: str = ""
    max_seeds: int | None = None  # --seeds auto: further seeds, up to this, for the arms still undecided

    def __post_init__(self):
        if self.seeds < 1:
            raise InputError(f"sweep {self.name}: seeds must be at least 1 (got {self.seeds})")
        if not self.axes:
            raise InputError(f"sweep {self.name}: no axes")
        if self.max_seeds is not None:
            SeedRule(self.seeds, self.max_seeds)  # a bad range is named here
            if self.combine == "product":
                raise InputError(
                    f"sweep {self.name}: --seeds auto allocates seeds per arm, one axis at a time; "
                    "a `combine: product` sweep takes a fixed number of seeds"
                )
        fields = [self.axis(name).field for name in self.axes]
        if twice := sorted({f for f in fields if fields.count(f) > 1}):
            raise InputError(f"sweep {self.name}: more than one axis sets {', '.join(twice)}")
        for name, arms in self.axes.items():
            axis = self.axis(name)
            for arm in arms:
                axis.overrides(arm)  # an unknown arm is named here
            if axis.reference not in arms:
                raise InputError(f"sweep {self.name}: axis {name} must keep its reference arm {axis.reference!r}")

    def axis(self, name: str) -> Axis:
        return get_axis(name, self.axes[name])

    def of_kind(self, kind: str) -> dict[str, tuple[str, ...]]:
        return {name: arms for name, arms in self.axes.items() if self.axis(name).kind == kind}

    def trial(self, arms: tuple[tuple[str, str], ...], seed: int) -> Trial:
        return Trial(arms, seed, tuple(self.axis(name) for name, _ in arms))

    @property
    def seed_rule(self) -> SeedRule | None:
        return SeedRule(self.seeds, self.max_seeds) if self.max_seeds is not None else None

    def combos(self) -> list[tuple[tuple[str, str], ...]]:
        """The arm of every training axis, per trained variant, reference first."""
        training = self.of_kind("training")
        reference = {name: self.axis(name).reference for name in training}
        if self.combine == "product":
            combos = [dict(zip(training, arms)) for arms in itertools.product(*training.values())]
        else:
            combos = [reference] + [
                {**reference, name: arm} for name, arms in training.items() for arm in arms if arm != reference[name]
            ]
        return [tuple(combo.items()) for combo in combos]

    def trials(self) -> list[Trial]:
        """Training runs (the first round's with --seeds auto), seed-major within each variant, reference first."""
        return [self.trial(combo, seed) for combo in self.combos() for seed in range(self.seeds)]

    def sampling_overrides(self, axis: str, arm: str) -> list[str]:
        """The reference arm of every sampling axis, with `axis` moved to `arm`."""
        sampling = self.of_kind("sampling")
        return [
            o
            for name in sampling
            for o in self.axis(name).overrides(arm if name == axis else self.axis(name).reference)
        ]


def preset_names() -> list[str]:
    """The presets in ablations/presets, by name."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_preset(name: str) -> SweepPlan:
    path = PRESETS / f"{name}.yaml"
    if not path.is_file():
        raise MissingInput(f"no sweep preset {name!r} (presets: {', '.join(preset_names())})")
    spec = yaml.safe_load(path.read_text())
    axes = {axis: tuple(str(a) for a in arms) if arms else get_axis(axis).arms for axis, arms in spec["axes"].items()}
    return SweepPlan(
        name=name,
        config=str(PROJECT_ROOT / spec["config"]),
        axes=axes,
        seeds=int(spec["seeds"]),
        overrides=tuple(spec.get("set", [])),
        combine=spec.get("combine", "one_at_a_time"),
        description=spec.get("description", ""),
    )
