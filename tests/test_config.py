from pathlib import Path

import pytest
import yaml

from mmdit_core.config import SIZE_PRESETS, ConfigError, ExperimentConfig, build_config, load_config


def refused(tree, overrides=None) -> str:
    with pytest.raises(ConfigError) as exc:
        build_config(tree, overrides)
    return str(exc.value)


def test_defaults_resolve_shapes_from_other_sections():
    cfg = build_config({})
    assert (cfg.model.width, cfg.model.depth, cfg.model.num_heads) == tuple(SIZE_PRESETS["tiny"].values())
    assert cfg.model.input_size == cfg.data.image_size and cfg.model.in_channels == 3
    latent = build_config({"autoencoder": {"kind": "trained", "factor": 4, "latent_channels": 4}})
    assert latent.model.input_size == 8 and latent.model.in_channels == 4


@pytest.mark.parametrize("size", list(SIZE_PRESETS))
def test_size_presets(size):
    cfg = build_config({"model": {"size": size}})
    assert cfg.model.width == SIZE_PRESETS[size]["width"]


def test_explicit_width_beats_preset():
    assert build_config({"model": {"size": "B", "width": 96, "num_heads": 4}}).model.width == 96


def test_unknown_key_names_field():
    assert "model.widht: unknown key" in refused({"model": {"widht": 64}})
    assert "bogus: unknown key" in refused({"bogus": {}})


def test_wrong_type_names_field():
    msg = refused({}, ["train.steps=abc"])
    assert "train.steps" in msg and "abc" in msg
    assert "train.batch_size" in refused({"train": {"batch_size": "64"}})  # strict: a string is not an int
    assert "flow.cfg_dropout" in refused({"flow": {"cfg_dropout": True}})


def test_bad_switch_value_names_field():
    msg = refused({}, ["model.sdpa_layout=heads_last"])
    assert "model.sdpa_layout" in msg and "heads_first" in msg


def test_out_of_range_names_field():
    assert "flow.cfg_dropout" in refused({}, ["flow.cfg_dropout=1.5"])
    assert "sample.steps" in refused({}, ["sample.steps=0"])
    assert "eval.val_t" in refused({}, ["eval.val_t=[0.5, 2.0]"])


def test_impossible_combinations_name_fields():
    msg = refused({}, ["data.image_size=30", "model.patch_size=4"])
    assert "data.image_size=30" in msg and "patch_size" in msg
    msg = refused(
        {"autoencoder": {"kind": "trained", "factor": 4}, "data": {"image_size": 24}, "model": {"patch_size": 4}}
    )
    assert "data.image_size=24" in msg
    assert "model.num_heads" in refused({}, ["model.width=100", "model.num_heads=3"])
    assert "model.block=cross" in refused({}, ["model.block=cross", "model.sdpa_layout=seq_first"])
    assert "model.text_dim" in refused({}, ["model.text_dim=512"])
    assert "autoencoder.block_out_channels" in refused({}, ["autoencoder.kind=trained", "autoencoder.factor=8"])
    assert "data.min_objects" in refused({}, ["data.min_objects=3", "data.max_objects=2"])


def test_bad_override_syntax():
    assert "section.field=value" in refused({}, ["model.width"])
    assert "model.width is not a section" in refused({"model": {"width": 64}}, ["model.width.x=3"])
    assert "model.width" in refused({}, ["model.width.x=3"])


def test_yaml_and_flat_round_trip(tmp_path):
    cfg = build_config({"name": "rt"}, ["model.pos_emb=rope2d", "flow.time_sampling=mode", "sample.cfg_scale=2.5"])
    assert ExperimentConfig.from_yaml(cfg.to_yaml()) == cfg
    flat = cfg.to_flat()
    assert flat["model.pos_emb"] == "rope2d" and flat["sample.cfg_scale"] == 2.5
    assert ExperimentConfig.from_flat(flat) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(cfg.to_yaml())
    assert load_config(path) == cfg
    assert cfg.short_hash() == load_config(path).short_hash()
    assert build_config({"name": "rt"}).short_hash() != cfg.short_hash()
    assert build_config({"name": "rt", "clip": {"width": 64}}).short_hash() == build_config({"name": "rt"}).short_hash()


def test_load_config_file_name_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"train": {"steps": 10}}))
    cfg = load_config(path, ["train.lr=0.01"])
    assert cfg.name == "mine" and cfg.train.steps == 10 and cfg.train.lr == 0.01
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).parent.parent / "experiments" / "configs").glob("*.yaml")), ids=lambda p: p.stem
)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem and cfg.model.num_patches > 0
