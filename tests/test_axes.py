"""The ablation-axis registry: every arm builds a valid config that differs from the reference only in its field."""

from pathlib import Path

import pytest

from ablations.axes import AXES, get_axis
from mmdit_core.config import flatten, load_config

CONFIGS = Path(__file__).parent.parent / "experiments" / "configs"


@pytest.mark.parametrize("config", ["demo.yaml", "scenes.yaml"])
@pytest.mark.parametrize("axis", sorted(AXES))
def test_every_arm_builds_a_valid_config_that_changes_only_its_field(axis, config):
    axis = AXES[axis]
    reference = flatten(load_config(CONFIGS / config, axis.overrides(axis.reference)).to_dict())
    values = set()
    for arm in axis.arms:
        flat = flatten(load_config(CONFIGS / config, axis.overrides(arm)).to_dict())
        assert {k for k in flat if flat[k] != reference[k]} <= {axis.field}
        values.add(flat[axis.field])
    assert len(values) == len(axis.arms)  # every arm is a different setting
    assert axis.field.split(".")[0] in (
        ("sample", "eval") if axis.kind == "sampling" else ("model", "flow", "autoencoder")
    )
    assert axis.tests and axis.source


def test_unknown_axis_and_arm_are_named():
    with pytest.raises(KeyError, match="unknown axis 'posemb'"):
        get_axis("posemb")
    with pytest.raises(KeyError, match="no arm 'alibi'.*learned, sincos, rope2d, msrope, none"):
        AXES["pos_emb"].overrides("alibi")
