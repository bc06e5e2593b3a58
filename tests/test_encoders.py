import pytest
import torch
from conftest import tiny_clip_config
from PIL import Image

from mmdit_core.autoencoder import Autoencoder, build_vae, foreground_weights, identity_key, vae_loss
from mmdit_core.config import AutoencoderConfig, TextConfig, build_config
from mmdit_core.data.images import to_tensor
from mmdit_core.data.latents import (
    StaleCacheError,
    cache_components,
    check_latent_cache,
    decode_latent_sample,
    write_latent_cache,
)
from mmdit_core.data.scenes import PLAIN_BACKGROUND, make_scene, render
from mmdit_core.data.shards import ShardStream, encode_sample, make_loader, read_manifest, split_shards, write_dataset
from mmdit_core.data.training import TrainingData
from mmdit_core.text import TextEncoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return TextEncoder(TextConfig(cache_dir=str(tmp_path_factory.mktemp("text_cache"))))


def test_text_encoder_shapes_mask_and_pooling(encoder):
    cond = encoder.encode(["a small red circle in the center", "a large blue square on the left and a cyan cross"])
    assert cond.text.shape == (2, 32, 384) and cond.mask.shape == (2, 32) and cond.pooled.shape == (2, 384)
    assert cond.mask[0].sum() < cond.mask[1].sum() and cond.mask[:, 0].all()
    assert not cond.text[0][~cond.mask[0]].any()  # padding states are zeroed
    expected = cond.text[0][cond.mask[0]].mean(0)
    torch.testing.assert_close(cond.pooled[0], expected)
    assert encoder.null().mask.sum() == 2  # [CLS] [SEP]
    zeros = encoder.null("zeros")  # flow.null_text=zeros: what the silent-bug arm trains its dropped captions on
    assert torch.equal(zeros.mask, encoder.null().mask) and not zeros.text.any() and not zeros.pooled.any()
    assert encoder.null().text.any()


def test_text_cache_hits_in_memory_and_on_disk(encoder):
    captions = ["a yellow triangle at the top", "a purple cross at the bottom"]
    first = encoder.encode(captions)
    misses = encoder.misses
    again = encoder.encode(captions * 2)
    assert encoder.misses == misses and torch.equal(again.text[:2], first.text)
    fresh = TextEncoder(encoder.cfg)  # same cache directory: nothing is re-encoded
    from_disk = fresh.encode(captions)
    assert fresh.misses == 0 and fresh.hits == 2
    assert torch.equal(from_disk.text, first.text) and torch.equal(from_disk.mask, first.mask)
    torch.testing.assert_close(from_disk.pooled, first.pooled, rtol=0, atol=0)


def test_text_dim_mismatch_is_named():
    with pytest.raises(ValueError, match="text.dim=512"):
        TextEncoder(TextConfig(dim=512, cache_dir=None))


def tiny_ae_config(path, kind="trained") -> AutoencoderConfig:
    return AutoencoderConfig(
        kind=kind, path=str(path), latent_channels=4, factor=2, block_out_channels=[8, 8], layers_per_block=1
    )


def test_autoencoder_trains_and_round_trips_through_from_pretrained(tmp_path):
    cfg = tiny_ae_config(tmp_path / "ae")
    torch.manual_seed(0)
    vae = build_vae(cfg)
    optimizer = torch.optim.Adam(vae.parameters(), lr=2e-3)
    pixels = torch.stack([to_tensor(render(make_scene(0, i), 16)) for i in range(8)])
    losses = []
    for _ in range(15):
        loss, parts = vae_loss(vae, pixels, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(parts["recon"])
    assert losses[-1] < losses[0]
    vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    vae.save_pretrained(cfg.path)
    loaded = Autoencoder.load(cfg)
    assert (loaded.shift, loaded.scale) == (0.1, 2.0)
    with torch.no_grad():
        expected = (vae.eval().encode(pixels).latent_dist.mean - 0.1) * 2.0
    latents = loaded.encode(pixels)
    assert latents.shape == (8, 4, 8, 8)
    torch.testing.assert_close(latents, expected)
    assert loaded.decode(latents).shape == pixels.shape
    assert not any(p.requires_grad for p in loaded.parameters())
    raw = Autoencoder.load(cfg.model_copy(update={"latent_norm": "none"}))  # the forgotten-scaling-factor arm
    assert (raw.shift, raw.scale) == (0.0, 1.0)
    torch.testing.assert_close(raw.encode(pixels), loaded.encode_raw(pixels))
    torch.testing.assert_close(loaded.normalise(loaded.encode_raw(pixels)), expected)


def test_foreground_weights_mark_the_objects_of_a_scene():
    pixels = torch.stack([to_tensor(render(make_scene(0, i), 32)) for i in range(4)])
    weights = foreground_weights(pixels, 5.0)  # (B, 1, H, W)
    background = to_tensor(Image.new("RGB", (32, 32), PLAIN_BACKGROUND))
    on_background = (pixels - background).abs().sum(1, keepdim=True) < 1e-6
    assert weights.shape == (4, 1, 32, 32) and set(weights.unique().tolist()) == {1.0, 5.0}
    assert (weights[on_background] == 1).all() and (weights[~on_background] == 5).float().mean() > 0.9
    assert torch.equal(foreground_weights(pixels, 1.0), torch.ones_like(weights))


def test_pretrained_autoencoder_by_path_and_shape_checks(tmp_path):
    """A tiny random AutoencoderKL saved to disk stands in for a hub VAE (nothing downloads here)."""
    build_vae(tiny_ae_config(tmp_path)).save_pretrained(tmp_path / "vae")
    ae = Autoencoder.load(
        tiny_ae_config(tmp_path, kind="pretrained").model_copy(update={"path": str(tmp_path), "subfolder": "vae"})
    )
    assert ae.encode(torch.zeros(1, 3, 8, 8)).shape == (1, 4, 4, 4)
    bad = tiny_ae_config(tmp_path / "vae", kind="pretrained").model_copy(update={"latent_channels": 8})
    with pytest.raises(ValueError, match="autoencoder.latent_channels=8"):
        Autoencoder.load(bad)
    with pytest.raises(FileNotFoundError, match="train_autoencoder"):
        Autoencoder.load(tiny_ae_config(tmp_path / "nothing"))
    identity = Autoencoder.load(AutoencoderConfig())
    x = torch.randn(1, 3, 4, 4)
    assert identity.encode(x) is x and identity.decode(x) is x


def test_latent_cache_round_trip_and_stale_cache_refused(tmp_path, encoder):
    write_dataset(
        tmp_path / "ds",
        {"train": (encode_sample(f"k{i}", render(make_scene(0, i), 16), make_scene(0, i).caption) for i in range(6))},
        4,
        {},
    )
    build_vae(tiny_ae_config(tmp_path)).save_pretrained(tmp_path / "ae")
    cfg = build_config(
        {
            "data": {"root": str(tmp_path / "ds"), "image_size": 16},
            "autoencoder": {
                "kind": "trained",
                "path": str(tmp_path / "ae"),
                "factor": 2,
                "latent_channels": 4,
                "block_out_channels": [8, 8],
            },
            "text": {"cache_dir": encoder.cfg.cache_dir},
        }
    )
    autoencoder = Autoencoder.load(cfg.autoencoder)
    batches = make_loader(split_shards(cfg.data.root, "train"), 4)
    write_latent_cache(cfg, tmp_path / "cache", batches, autoencoder, encoder)
    expected = cache_components(cfg, read_manifest(cfg.data.root)["key"], encoder.key)
    check_latent_cache(tmp_path / "cache", expected)
    samples = list(ShardStream(split_shards(tmp_path / "cache", "train"), transform=decode_latent_sample(32)))
    assert [s["key"] for s in samples] == [f"k{i}" for i in range(6)]
    scene = make_scene(0, 2)
    pixels = to_tensor(render(scene, 16))[None]
    torch.testing.assert_close(samples[2]["latent"], autoencoder.encode_raw(pixels)[0])  # raw: normalised when read
    autoencoder.vae.register_to_config(shift_factor=0.5, scaling_factor=3.0)  # read when training, not cached
    for norm, expected_latent in (
        ("scale_shift", autoencoder.encode(pixels)),
        ("none", autoencoder.encode_raw(pixels)),
    ):
        arm = cfg.model_copy(
            update={
                "data": cfg.data.model_copy(update={"latent_cache": str(tmp_path / "cache")}),
                "autoencoder": cfg.autoencoder.model_copy(update={"latent_norm": norm}),
            }
        )
        fed = TrainingData(arm, Autoencoder(arm.autoencoder, autoencoder.vae), encoder)
        x0, _ = fed.model_inputs(
            {
                **samples[2],
                "latent": samples[2]["latent"][None],
                "text": samples[2]["text"][None],
                "mask": samples[2]["mask"][None],
                "pooled": samples[2]["pooled"][None],
            }
        )
        torch.testing.assert_close(x0, expected_latent)
    cond = encoder.encode([scene.caption])
    assert torch.equal(samples[2]["mask"], cond.mask[0]) and torch.equal(samples[2]["text"], cond.text[0])

    build_vae(tiny_ae_config(tmp_path)).save_pretrained(tmp_path / "ae")  # retrained: new weights
    changed = cache_components(cfg, expected["dataset"], encoder.key)
    with pytest.raises(StaleCacheError, match="autoencoder"):
        check_latent_cache(tmp_path / "cache", changed)
    with pytest.raises(StaleCacheError, match="text_encoder"):
        check_latent_cache(tmp_path / "cache", {**expected, "text_encoder": "other"})
    assert identity_key(cfg.autoencoder) != expected["autoencoder"]


@pytest.mark.parametrize("kind", ["clip", "t5"])
def test_clip_and_t5_checkpoints_load_their_text_tower(tmp_path, encoder, kind):
    from transformers import CLIPModel, T5Config, T5ForConditionalGeneration

    vocab = encoder.tokenizer.vocab_size
    if kind == "clip":  # a full CLIP (text + vision), as on the hub: only the text tower must load
        model = CLIPModel(tiny_clip_config(vocab, max_position_embeddings=64))
    else:  # a full T5 (encoder + decoder): only the encoder must load
        model = T5ForConditionalGeneration(
            T5Config(vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
        )
    model.save_pretrained(tmp_path)
    encoder.tokenizer.save_pretrained(tmp_path)
    tiny = TextEncoder(TextConfig(encoder=str(tmp_path), dim=16, max_length=12, cache_dir=None))
    assert type(tiny.model).__name__ == {"clip": "CLIPTextModel", "t5": "T5EncoderModel"}[kind]
    cond = tiny.encode(["a red circle", "a blue square on the left"])
    assert cond.text.shape == (2, 12, 16) and cond.pooled.shape == (2, 16) and torch.isfinite(cond.text).all()
