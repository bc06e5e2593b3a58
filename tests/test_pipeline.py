"""The data-stage commands end to end on a tiny config: prepare -> autoencoder -> latent cache -> loader bench."""

import json

import pytest

from experiments import bench, cache_latents, prepare_data, train_autoencoder


def test_data_stage_commands(tmp_path, capsys):
    common = [f"data.root={tmp_path / 'ds'}", "data.image_size=16", "data.num_train=48", "data.num_val=12",
              "data.samples_per_shard=16", "data.num_workers=0", "autoencoder.kind=trained",
              f"autoencoder.path={tmp_path / 'ae'}", "autoencoder.factor=2", "autoencoder.block_out_channels=[8, 8]",
              "autoencoder.train_steps=3", "autoencoder.batch_size=8", f"text.cache_dir={tmp_path / 'text'}",
              f"data.latent_cache={tmp_path / 'cache'}", "train.batch_size=8"]
    args = [arg for item in common for arg in ("--set", item)]

    manifest = prepare_data.main(args)
    assert manifest["splits"]["train"]["samples"] == 48 and len(manifest["splits"]["train"]["shards"]) == 3
    assert prepare_data.main(args)["key"] == manifest["key"]
    assert "already holds this data" in capsys.readouterr().out

    summary = train_autoencoder.main(args)
    assert summary["val_psnr_db"] > 0 and (tmp_path / "ae" / "recon.png").is_file()
    assert json.loads((tmp_path / "ae" / "summary.json").read_text())["scale"] == summary["scale"]

    cache = cache_latents.main(args)
    assert cache["splits"]["train"]["samples"] == 48

    results = bench.main(args + ["--seconds", "0.2", "--repeats", "1", "--inception-batch", "2",
                                 "--out", str(tmp_path / "bench.json")])
    assert set(results["loader_samples_per_s"]) == {"shards, 0 workers", "latent_cache, 0 workers"}
    assert all(rate > 0 for rate in results["loader_samples_per_s"].values())
    assert len(results["sampling_img_per_s"]) == 6 and all(rate > 0 for rate in results["sampling_img_per_s"].values())
    assert results["inception_img_per_s"] > 0 and results["fid_seconds"] > 0
    assert json.loads((tmp_path / "bench.json").read_text()) == results


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="data.image_size=15"):
        prepare_data.main(["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.image_size=15"])
    assert not (tmp_path / "ds").exists()
