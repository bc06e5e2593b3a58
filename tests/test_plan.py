"""Sweep plans: presets load, trials are the training arms × seeds, sampling arms never add trials."""

import pytest

from ablations.axes import AXES, get_axis
from ablations.plan import PRESETS, SweepPlan, load_preset
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
    assert plan.trial((("pos_emb", "none"),), 2).overrides() == ["model.pos_emb=none", "train.seed=2"]
    assert plan.trial((("pos_emb", "none"), ("sdpa_layout", "heads_first")), 2).name == "pos_emb=none-s2"


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


def test_any_config_field_is_an_axis_its_first_value_the_reference():
    plan = SweepPlan(
        "p", "unused.yaml", {"model.width": ("128", "64", "256"), "sample.cfg_scale": ("2.0", "4.0")}, seeds=2
    )
    assert plan.axis("model.width").kind == "training" and plan.axis("sample.cfg_scale").kind == "sampling"
    assert [t.name for t in plan.trials()] == [
        "reference-s0",
        "reference-s1",
        "model.width=64-s0",
        "model.width=64-s1",
        "model.width=256-s0",
        "model.width=256-s1",
    ]
    assert plan.trials()[2].overrides() == ["model.width=64", "train.seed=0"]
    assert plan.sampling_overrides("reference", "reference") == ["sample.cfg_scale=2.0"]
    assert get_axis("flow.shift", ("3.0", "1.0")).reference == "3.0"
    assert get_axis("model.sdpa_layout", ("heads_first", "seq_first")).kind == "training"
    assert get_axis("eval.weights", ("ema", "model")).kind == "training"  # not a field GRID samples with
    with pytest.raises(KeyError, match="two or more different values"):
        get_axis("model.width", ("128",))
    with pytest.raises(ValueError, match="more than one axis sets model.pos_emb"):
        SweepPlan("p", "c.yaml", {"pos_emb": ("learned", "none"), "model.pos_emb": ("rope2d", "learned")}, seeds=1)
    with pytest.raises(KeyError, match="or any config field"):
        get_axis("width")
