"""Sweep plans: presets load, trials are the training arms × seeds, sampling arms never add trials."""

import pytest

from ablations.axes import AXES
from ablations.plan import PRESETS, SweepPlan, Trial, load_preset
from mmdit_core.config import load_config


def test_critical_details_trains_each_arm_once_per_seed_and_samples_the_rest():
    plan = load_preset("critical_details")
    trials = plan.trials()
    assert [t.name for t in trials[:3]] == ["reference-s0", "reference-s1", "reference-s2"]
    assert {t.moved for t in trials} == {
        (),
        (("sdpa_layout", "seq_first"),),
        (("pos_emb", "none"),),
        (("loss_space", "image"),),
    }
    # the reference run sets every reference arm explicitly: the demo config itself uses 2-D RoPE
    assert trials[0].overrides() == [
        "model.sdpa_layout=heads_first",
        "model.pos_emb=learned",
        "flow.loss_space=latent",
        "train.seed=0",
    ]
    assert len(trials) == 4 * 3  # cfg_scale is sampling-time: no trial of its own
    assert plan.of_kind("sampling") == {"cfg_scale": ("1.0", "2.0", "4.0", "7.0")}
    assert plan.sampling_overrides("cfg_scale", "4.0") == ["sample.cfg_scale=4.0"]
    assert plan.sampling_overrides("reference", "reference") == ["sample.cfg_scale=1.0"]
    assert Trial((("pos_emb", "none"),), 2).overrides() == ["model.pos_emb=none", "train.seed=2"]
    assert Trial((("pos_emb", "none"), ("sdpa_layout", "heads_first")), 2).name == "pos_emb=none-s2"


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESETS.glob("*.yaml")))
def test_every_preset_trial_builds_a_valid_config(preset):
    plan = load_preset(preset)
    assert plan.description and plan.trials()
    names = set()
    for trial in plan.trials():
        cfg = load_config(plan.config, [*plan.overrides, *trial.overrides()])
        names.add(cfg.run_name())
        for axis, arms in plan.of_kind("sampling").items():
            for arm in arms:
                load_config(plan.config, [*plan.overrides, *trial.overrides(), *plan.sampling_overrides(axis, arm)])
    assert len(names) == len(plan.trials())  # every trial is its own training run


def test_product_combines_every_arm_and_bad_plans_are_named():
    plan = SweepPlan(
        "p",
        "unused.yaml",
        {"block": ("joint", "cross"), "qk_norm": ("none", "rmsnorm"), "ema": AXES["ema"].arms},
        seeds=1,
        combine="product",
    )
    assert {t.moved for t in plan.trials()} == {
        (),
        (("block", "cross"),),
        (("qk_norm", "rmsnorm"),),
        (("block", "cross"), ("qk_norm", "rmsnorm")),
    }
    with pytest.raises(ValueError, match="keep its reference arm 'learned'"):
        SweepPlan("p", "c.yaml", {"pos_emb": ("none",)}, seeds=1)
    with pytest.raises(KeyError, match="no arm 'alibi'"):
        SweepPlan("p", "c.yaml", {"pos_emb": ("learned", "alibi")}, seeds=1)
    with pytest.raises(FileNotFoundError, match="presets: architecture, bugs, critical_details"):
        load_preset("critical")
