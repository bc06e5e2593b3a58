"""The data-stage commands end to end on a tiny config: prepare -> autoencoder -> latent cache -> bench."""

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

    tiny_model = ["--set", "model.width=32", "--set", "model.num_heads=2", "--set", "model.depth=1"]
    results = bench.main(args + tiny_model + ["--seconds", "0.2", "--repeats", "1", "--inception-batch", "2", "--no-compile", "--matmul-size", "128",
                                              "--larger", "model.width=64", "--out", str(tmp_path / "bench.json")])
    rows = results["training_step"]
    assert {(r["setting"], r["precision"], r["model"]) for r in rows} == {
        (s, p, m) for s in ("default", "larger") for p in ("fp32", "bf16") for m in ("mmdit", "diffusers_sd3", "mmdit+checkpointing")}
    assert all(r["seconds_per_step"] > 0 and r["params"] > 0 and r["gflop_per_step"] > 0 and r["mfu"] > 0 and r["peak_mib"] > 0
               for r in rows)
    for setting in ("default", "larger"):  # equal shapes: both models do the same work, give or take norms and biases
        flops = {r["model"]: r["gflop_per_step"] for r in rows if r["setting"] == setting and r["precision"] == "fp32"}
        assert flops["mmdit"] == pytest.approx(flops["diffusers_sd3"], rel=0.01)
    assert set(results["speedup_vs_diffusers"]) == {"default fp32", "default bf16", "larger fp32", "larger bf16"}
    assert all(set(by_model) == {"mmdit", "mmdit+checkpointing"} for by_model in results["speedup_vs_diffusers"].values())
    assert set(results["matmul_peak"]) == {"fp32", "bf16"} and results["matmul_peak"]["fp32"]["n"] == 128
    assert [(r["image_tokens"], r["depth"]) for r in results["scaling"]] == [(64, 1), (256, 1), (1024, 1), (16, 2), (16, 4), (16, 8)]
    assert set(results["loader"]) == {"shards, 0 workers", "latent_cache, 0 workers"}
    assert all(v["samples_per_s"] > 0 for v in results["loader"].values())
    assert len(results["sampling"]) == 6 and all(v["img_per_s"] > 0 and v["peak_mib"] > 0 for v in results["sampling"].values())
    assert results["inception"]["img_per_s"] > 0 and results["inception"]["fid_seconds"] > 0
    assert "| larger | bf16 | diffusers_sd3 |" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text()) == results


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(SystemExit, match="data.image_size=15"):
        prepare_data.main(["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.image_size=15"])
    assert not (tmp_path / "ds").exists()
