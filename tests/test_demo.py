"""`experiments.demo` runs every stage (import, autoencoder, CLIP, latent cache, Ray Train, evaluation, its
summary) on data that is not the built-in scenes: an image folder, img2dataset-style shards and a URL table
served on loopback; and the commands answer a user's mistakes with one line, never a traceback."""

import functools
import json
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from test_import import EXT, GOOD_IMAGES, image_bytes, write_img2dataset_shard

from experiments import demo, prepare_data
from mmdit_core.data.shards import SkipCounts, make_loader, read_manifest, split_shards

PROJECT = Path(__file__).parent.parent
TINY_DEMO = {  # every stage of the demo at a size that runs in seconds
    "data.image_size": 16,
    "data.num_train": 24,
    "data.num_val": 8,
    "data.samples_per_shard": 8,
    "data.shuffle_buffer": 8,
    "autoencoder.factor": 2,
    "autoencoder.latent_channels": 4,
    "autoencoder.block_out_channels": "[8, 8]",
    "autoencoder.train_steps": 2,
    "autoencoder.batch_size": 8,
    "clip.width": 16,
    "clip.depth": 1,
    "clip.num_heads": 2,
    "clip.patch_size": 8,
    "clip.vocab_size": 64,
    "clip.train_steps": 2,
    "clip.batch_size": 8,
    "model.width": 32,
    "model.depth": 1,
    "model.num_heads": 2,
    "train.steps": 2,
    "train.batch_size": 4,
    "train.log_every": 1,
    "train.checkpoint_every": 2,
    "train.num_grid_samples": 4,
    "sample.steps": 2,
    "eval.num_samples": 8,
    "eval.batch_size": 8,
    "eval.val_loss_samples": 8,
    "eval.val_t": "[0.5]",
}


def demo_args(tmp_path: Path, **fields) -> list[str]:
    where = {
        "data.root": tmp_path / "ds",
        "data.latent_cache": tmp_path / "latents",
        "autoencoder.path": tmp_path / "ae",
        "text.cache_dir": tmp_path / "text",
        "train.storage_path": tmp_path / "runs",
        "eval.stats_dir": tmp_path / "fid_stats",
    }
    return [arg for key, value in (TINY_DEMO | where | fields).items() for arg in ("--set", f"{key}={value}")]


def write_folder(path: Path, count: int, uncaptioned: int = 0) -> None:
    """`count` images of several sizes and formats with same-name .txt captions, but for the last `uncaptioned`."""
    path.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        fmt, size, mode = GOOD_IMAGES[i % len(GOOD_IMAGES)]
        (path / f"img{i:03d}.{EXT[fmt]}").write_bytes(image_bytes(fmt, size, mode, seed=i))
        if i < count - uncaptioned:
            (path / f"img{i:03d}.txt").write_text(f"a {('red', 'blue')[i % 2]} thing number {i % 5}")


@pytest.fixture
def file_server(tmp_path):
    """A loopback HTTP server of tmp_path/www, stopped after the test."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def source_fields(kind: str, tmp_path: Path, file_server) -> dict:
    if kind == "folder":
        write_folder(tmp_path / "photos", 36)
        return {"data.source": "folder", "data.import_path": tmp_path / "photos"}
    if kind == "webdataset":
        (tmp_path / "laion").mkdir()
        for shard in range(3):
            write_img2dataset_shard(tmp_path / "laion" / f"{shard:05d}.tar", 12 * shard, 12)
        return {"data.source": "webdataset", "data.import_path": f"{tmp_path}/laion/{{00000..00002}}.tar"}
    www, base = file_server
    write_folder(www, 36)
    rows = [
        {"url": f"{base}/{p.name}", "caption": p.with_suffix(".txt").read_text()}
        for p in sorted(www.iterdir())
        if p.suffix != ".txt" and p.with_suffix(".txt").exists()
    ]
    rows.append({"url": f"{base}/missing.png", "caption": "never served"})
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"data.source": "urls", "data.import_path": tmp_path / "urls.jsonl", "data.fetch.workers": 4}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", ["folder", "webdataset", "urls"])
def test_demo_runs_every_stage_on_a_foreign_source(kind, tmp_path, monkeypatch, capsys, local_ray, file_server):
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    summary = demo.main(demo_args(tmp_path, **source_fields(kind, tmp_path, file_server)))
    out = capsys.readouterr().out

    assert summary["status"] == "FINISHED"
    m = summary["eval"]
    assert m["num_samples"] == 8 and m["fid"] > 0 and "clip_score" in m
    assert not any(k.startswith("adherence_") for k in m)  # no scene attributes: no oracle, and no crash
    assert "adherence skipped" in out and f"FID {m['fid']:.1f}" in out
    # the CLIP was validated on this data without scene attributes: retrieval and own vs shuffled, no swaps
    validation = summary["clip"]["validation"]
    assert set(validation) == {"images", "retrieval", "own_vs_shuffled"} and validation["images"] == 8
    assert (
        "psnr_db" in summary["autoencoder"]["fidelity"] and "reconstructions" not in summary["autoencoder"]["fidelity"]
    )
    for stage in ("data", "autoencoder", "CLIP", "latent cache", "training (Ray Train)", "evaluation"):
        assert summary["stage_seconds"][stage] >= 0
    assert Path(summary["grid"]).is_file() and Path(summary["eval"]["report"]).is_file()
    client = MlflowClient(uri)
    stage_runs = {}
    for experiment in ("autoencoder", "clip"):
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        assert run.info.status == "FINISHED"
        stage_runs[experiment] = run.info.run_id
    # the UI's Dataset column and lineage: the data as a dataset input, the autoencoder's and CLIP's runs as tags
    experiments = [e for e in client.search_experiments() if e.name != "Default"]
    assert all(e.tags.get("mlflow.experimentKind") == "custom_model_development" for e in experiments)
    (training,) = client.search_runs([e.experiment_id for e in experiments], "tags.`autoencoder.run_id` != ''")
    assert training.data.tags["autoencoder.run_id"] == stage_runs["autoencoder"]
    assert training.data.tags["clip.run_id"] == stage_runs["clip"]
    (used,) = training.inputs.dataset_inputs
    assert used.dataset.name == "ds" and used.dataset.digest == read_manifest(tmp_path / "ds")["key"]
    assert json.loads(used.dataset.profile)["samples"]["train"] > 0
    assert "?workflowType=machine_learning" in out


def test_a_clip_whose_validation_fails_is_saved_and_validated_when_reused(tmp_path, monkeypatch, capsys):
    from experiments import train_clip
    from mmdit_core.config import load_config

    write_folder(tmp_path / "photos", 20)
    overrides = demo_args(tmp_path, **{"data.source": "folder", "data.import_path": tmp_path / "photos"})[1::2]
    cfg = load_config(None, overrides)
    prepare_data.prepare(cfg)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    real_validation = train_clip.validation

    def broken(cfg, scorer):
        raise RuntimeError("validation crashed")

    monkeypatch.setattr(train_clip, "validation", broken)
    with pytest.raises(RuntimeError, match="validation crashed"):
        train_clip.train_and_save(cfg, uri)
    saved = json.loads((tmp_path / "ds_clip" / "summary.json").read_text())
    assert "validation" not in saved and saved["steps"] == 2  # the training is kept
    (run,) = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("clip").experiment_id])
    assert run.info.status == "FAILED"

    monkeypatch.setattr(train_clip, "validation", real_validation)
    summary = train_clip.reuse_or_train(cfg, uri)  # not trained again: validated
    assert "was saved but its validation was never measured" in capsys.readouterr().out
    assert summary["weights_sha256"] == saved["weights_sha256"] and summary["validation"]["images"] > 0
    assert json.loads((tmp_path / "ds_clip" / "summary.json").read_text()) == summary


# ---- a user's mistakes ----------------------------------------------------------------------------


def command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=PROJECT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (("--set", "data.source=folder"), "data.import_path is required for data.source=folder"),
        (("--set", "data.source=webdataset"), "data.import_path is required for data.source=webdataset"),
        (("--set", "data.source=folder", "--set", "data.import_path=/nowhere"), "data.import_path=/nowhere does not"),
    ],
)
def test_user_errors_print_one_line_and_exit_non_zero(tmp_path, args, message):
    result = command("experiments.prepare_data", "--set", f"data.root={tmp_path / 'ds'}", *args)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_importing_foreign_shards_gives_no_hint_to_import_them(tmp_path, capsys):
    (tmp_path / "laion").mkdir()
    write_img2dataset_shard(tmp_path / "laion" / "00000.tar", 0, 14)
    prepare_data.main(
        ["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.source=webdataset"]
        + ["--set", f"data.import_path={tmp_path / 'laion'}", "--set", "data.num_train=8", "--set", "data.num_val=4"]
    )
    assert "hint" not in capsys.readouterr().out
    counts = SkipCounts()  # reading shards written elsewhere as if they were this project's still earns it
    list(make_loader([str(tmp_path / "laion" / "00000.tar")], 4, image_size=32, counts=counts))
    assert "hint: these look like shards written elsewhere" in counts.report()


def test_asking_for_more_samples_than_the_source_has_warns_once(tmp_path, capsys):
    write_folder(tmp_path / "photos", 13, uncaptioned=1)  # 12 usable
    manifest = prepare_data.main(
        ["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.source=folder"]
        + ["--set", f"data.import_path={tmp_path / 'photos'}", "--set", "data.num_train=1000"]
    )
    train, val = (manifest["splits"][split]["samples"] for split in ("train", "val"))
    assert train + val == 12
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("warning:")] == [
        "warning: asked for data.num_train=1000 and data.num_val=256, but the source had only 12 usable "
        f"samples: wrote {train} train + {val} val"
    ]


def test_a_loader_without_image_size_takes_the_datasets_and_skips_the_others(tmp_path):
    (tmp_path / "mixed").mkdir()
    write_img2dataset_shard(tmp_path / "mixed" / "00000.tar", 0, 14)  # 14 sizes, (40, 30) first
    counts = SkipCounts()
    batches = list(make_loader([str(tmp_path / "mixed" / "00000.tar")], 4, counts=counts))
    assert {tuple(b["image"].shape[2:]) for b in batches} == {(30, 40)}  # the first image's size: (H, W)
    assert counts.totals()["size"] == 13

    write_folder(tmp_path / "photos", 10)
    prepare_data.main(
        ["--set", f"data.root={tmp_path / 'ds'}", "--set", "data.source=folder", "--set", "data.image_size=16"]
        + ["--set", f"data.import_path={tmp_path / 'photos'}", "--set", "data.num_train=6", "--set", "data.num_val=3"]
    )
    batches = list(make_loader(split_shards(tmp_path / "ds", "train"), 4))  # the manifest's data.image_size
    assert sum(len(b["caption"]) for b in batches) == 6 and batches[0]["image"].shape[2:] == (16, 16)
