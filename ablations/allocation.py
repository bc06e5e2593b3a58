"""Seeds where they decide (`--seeds auto`): after each round of training, a further seed goes only to
the arms whose paired difference to the reference is still undecided on a primary metric.

The rule. Round 1 trains every arm at `min_seeds`; each later round trains one more seed of every open
arm (and of the reference, which every paired difference needs), up to `max_seeds`. An arm is decided
when, on every primary metric it has (FID, CMMD, whole-caption adherence with shape), the interval of
its paired difference excludes 0; it stays open while any is undecided.

Looking after every round and stopping on what the data show would inflate the false-positive rate of
fixed-N 95% intervals. Every verdict of an auto sweep is therefore read from intervals at level
1 - 0.05 / L, with L = max_seeds - min_seeds + 1 the most looks the sweep can take: by Bonferroni over
the looks, the chance that an arm with no effect is ever declared different is at most 5%, whatever
stopping time the data choose. This is the same guarantee a confidence sequence gives (Howard et al.
2021, arXiv 1810.08240), bought with the knowledge of a small maximum number of looks: a sequence valid
for an unbounded horizon is far wider at 2-6 paired seeds, where these sweeps live. Dropping an arm
once decided is racing (Maron & Moore 1993); their Hoeffding races need bounded metrics, these t
intervals do not. Comparing training runs by paired seeds and stopping when the interval excludes 0
follows Colas et al. 2018 (arXiv 1806.08295), who also show how few seeds fixed-N comparisons afford.

    rule = SeedRule(2, 6)
    status = arm_status(summary, rule)   # (axis, arm) -> ArmStatus: seeds, open, why
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eval.stats import CONFIDENCE
from mmdit_core.errors import InputError

PRIMARY = ("eval/fid", "eval/cmmd", "eval/adherence_whole_shape")
DECIDED = ("better", "worse")


@dataclass(frozen=True)
class SeedRule:
    min_seeds: int
    max_seeds: int

    def __post_init__(self):
        if not 2 <= self.min_seeds <= self.max_seeds:
            raise InputError(
                f"--seeds auto: needs 2 <= min <= max seeds (got {self.min_seeds}-{self.max_seeds}): "
                "a paired interval needs 2 seeds"
            )

    @property
    def looks(self) -> int:
        return self.max_seeds - self.min_seeds + 1

    @property
    def confidence(self) -> float:
        """The level of every interval an auto sweep decides by (and reports)."""
        return 1 - (1 - CONFIDENCE) / self.looks

    def __str__(self) -> str:
        return f"auto:{self.min_seeds}-{self.max_seeds}"


@dataclass(frozen=True)
class ArmStatus:
    seeds: int  # paired with the reference
    open: bool  # gets another seed
    why: str


def arm_status(
    summary: dict[str, Any], reference_arms: dict[str, str], rule: SeedRule
) -> dict[tuple[str, str], ArmStatus]:
    """(axis, arm) -> its status, from a report summary computed at `rule.confidence`
    (ablations.report.summarise); `reference_arms`: axis -> its reference arm."""
    status = {}
    for axis, per_metric in summary.items():
        arms = {arm for metric in PRIMARY for arm in per_metric.get(metric, {}) if arm != reference_arms[axis]}
        for arm in sorted(arms):
            cells = {m: per_metric[m][arm] for m in PRIMARY if arm in per_metric.get(m, {})}
            seeds = max((c["diff"].n for c in cells.values() if c["diff"] is not None), default=0)
            undecided = [m for m, c in cells.items() if c["verdict"] not in DECIDED]
            if not undecided:
                status[(axis, arm)] = ArmStatus(seeds, False, f"decided at {seeds} seeds on {', '.join(cells)}")
            elif seeds >= rule.max_seeds:
                status[(axis, arm)] = ArmStatus(
                    seeds, False, f"undecided at the maximum of {rule.max_seeds} seeds on {', '.join(undecided)}"
                )
            else:
                status[(axis, arm)] = ArmStatus(seeds, True, f"undecided at {seeds} seeds on {', '.join(undecided)}")
    return status
