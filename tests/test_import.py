"""Importing real data: img2dataset-style shards (data.source=webdataset) and URL tables fetched from a
loopback HTTP server (data.source=urls), through prepare_data, the latent cache and training steps."""

import io
import json
import tarfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from experiments import cache_latents
from experiments.prepare_data import prepare
from mmdit_core.autoencoder import Autoencoder
from mmdit_core.config import load_config
from mmdit_core.data.images import fit, to_rgb
from mmdit_core.data.shards import make_loader, split_shards
from mmdit_core.data.sources import URL_COLUMNS, read_table
from mmdit_core.data.training import TrainingData
from mmdit_core.flow import RectifiedFlow
from mmdit_core.model import MMDiT
from mmdit_core.text import TextEncoder
from mmdit_core.trainer import Trainer

TINY = Path(__file__).parent / "tiny_train.yaml"


def image_bytes(fmt: str, size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    """A real image: a coloured rectangle on noise, saved in `fmt` from `mode`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = (200, 30, 30)
    image = Image.fromarray(pixels)
    if mode == "I;16":
        image = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257))
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


GOOD_IMAGES = [
    ("JPEG", (40, 30), "RGB"),
    ("PNG", (20, 20), "L"),
    ("PNG", (24, 32), "RGBA"),
    ("WEBP", (50, 50), "RGB"),
    ("PNG", (16, 48), "P"),
    ("PNG", (30, 30), "I;16"),
    ("JPEG", (64, 48), "L"),
    ("WEBP", (20, 28), "RGBA"),
    ("PNG", (12, 12), "RGB"),
    ("JPEG", (33, 17), "RGB"),
    ("PNG", (40, 40), "LA"),
    ("JPEG", (48, 64), "RGB"),
    ("WEBP", (36, 24), "RGB"),
    ("PNG", (64, 64), "RGB"),
]
EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def settings(tmp_path: Path, *extra: str) -> list[str]:
    return [
        f"data.root={tmp_path / 'ds'}",
        f"text.cache_dir={tmp_path / 'text'}",
        f"data.latent_cache={tmp_path / 'cache'}",
        *extra,
    ]


def config(tmp_path: Path, *extra: str):
    return load_config(TINY, settings(tmp_path, *extra))


def short_training(cfg, steps: int = 3) -> list[float]:
    """A few optimizer steps on what the data stage wrote (the latent cache when configured)."""
    autoencoder, encoder = Autoencoder.load(cfg.autoencoder), TextEncoder(cfg.text)
    torch.manual_seed(0)
    trainer = Trainer(cfg, MMDiT(cfg.model), RectifiedFlow(cfg.flow), encoder.null())
    losses = []
    for _, (x0, cond) in zip(range(steps), TrainingData(cfg, autoencoder, encoder)):
        losses.append(trainer.train_step(x0, cond)["loss"])
    return losses


# ---- images -------------------------------------------------------------------------------------


def test_images_are_made_rgb_as_a_viewer_shows_them():
    grey16 = Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16))
    assert np.asarray(to_rgb(grey16))[0, 0].tolist() == [156, 156, 156]  # scaled to 8 bits, not clipped to 255
    clear = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert np.asarray(to_rgb(clear))[0, 0].tolist() == [255, 255, 255]  # transparency on white, not black
    rotated = Image.new("RGB", (6, 2), "red")
    exif = rotated.getexif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    buffer = io.BytesIO()
    rotated.save(buffer, format="JPEG", exif=exif)
    assert to_rgb(Image.open(buffer)).size == (2, 6)
    assert fit(Image.new("RGB", (40, 20)), 16).size == (16, 16)


# ---- webdataset shards written elsewhere --------------------------------------------------------


def write_img2dataset_shard(path: Path, first: int, count: int, truncate: bool = False) -> list[str]:
    """img2dataset's layout: KEY.jpg (or .png / .webp), KEY.txt, KEY.json (url, caption, size...);
    returns the captions written."""
    captions, buffer = [], io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(first, first + count):
            fmt, size, mode = GOOD_IMAGES[i % len(GOOD_IMAGES)]
            key, caption = f"{i:09d}", f"photo number {i}"
            meta = {
                "url": f"https://example.com/{i}.{EXT[fmt]}",
                "caption": caption,
                "width": size[0],
                "height": size[1],
            }
            for name, data in (
                (f"{key}.{EXT[fmt]}", image_bytes(fmt, size, mode, i)),
                (f"{key}.txt", caption.encode()),
                (f"{key}.json", json.dumps(meta).encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            captions.append(caption)
    data = buffer.getvalue()
    path.write_bytes(data[: len(data) // 2] if truncate else data)
    return captions


def test_img2dataset_shards_import_with_every_good_sample_kept(tmp_path):
    shards = tmp_path / "laion"
    shards.mkdir()
    written = write_img2dataset_shard(shards / "00000.tar", 0, 10) + write_img2dataset_shard(
        shards / "00001.tar", 10, 10
    )
    write_img2dataset_shard(shards / "00002.tar", 20, 10, truncate=True)  # a download cut short
    cfg = config(
        tmp_path,
        "data.source=webdataset",
        f"data.import_path={shards}/{{00000..00002}}.tar",
        "data.num_train=40",
        "data.num_val=6",
        "data.image_size=16",
    )
    manifest = prepare(cfg)
    kept = manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"]
    survivors = manifest["available"] - 20  # what the truncated shard held before the cut
    assert manifest["splits"]["val"]["samples"] == 6 and kept == manifest["available"] and 0 < survivors < 10
    assert manifest["skipped"]["shard"] == 1  # the cut is counted, the samples before it kept
    captions = [
        c
        for split in ("train", "val")
        for b in make_loader(split_shards(cfg.data.root, split), 64)
        for c in b["caption"]
    ]
    assert set(written[:20]) <= set(captions) and len(captions) == kept
    batch = next(iter(make_loader(split_shards(cfg.data.root, "train"), 64, image_size=16)))
    assert batch["image"].shape == (len(batch["key"]), 3, 16, 16)  # every size and mode, one batch
    assert batch["attributes"][0]["url"].startswith("https://example.com/") and "shard" in batch["attributes"][0]

    # The same shards another way (a folder of .tar, captions from a JSON field) give the same images: the
    # split depends on the source keys, not on how the shards are named or ordered.
    again = config(
        tmp_path,
        "data.source=webdataset",
        f"data.import_path={shards}",
        "data.caption_field=caption",
        "data.num_train=40",
        "data.num_val=6",
        "data.image_size=16",
        f"data.root={tmp_path / 'again'}",
    )
    assert (
        prepare(again)["splits"]["train"]["shards"][0]["sha256"] == manifest["splits"]["train"]["shards"][0]["sha256"]
    )
    piped = config(
        tmp_path,
        "data.source=webdataset",
        f"data.import_path=pipe:cat {shards}/00000.tar",
        "data.num_train=4",
        "data.num_val=2",
        "data.image_size=16",
        f"data.root={tmp_path / 'piped'}",
    )
    assert prepare(piped)["available"] == 10


def test_a_missing_shard_path_is_named(tmp_path):
    cfg = config(tmp_path, "data.source=webdataset", f"data.import_path={tmp_path}/{{0..3}}.tar")
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shards do not exist, the first .*0\.tar"):
        prepare(cfg)


# ---- URL tables ---------------------------------------------------------------------------------


class LoopbackServer(ThreadingHTTPServer):
    """127.0.0.1 only; `routes[path]` is a list of responses (status, headers, body, delay_s), served in turn
    to successive requests (the last one repeats); every request is counted in `hits`."""

    daemon_threads = True

    def __init__(self, routes):
        super().__init__(("127.0.0.1", 0), Handler)
        self.routes, self.hits = routes, Counter()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.server.hits[self.path] += 1
        responses = self.server.routes.get(self.path, [(404, {}, b"no such image", 0)])
        status, headers, body, delay = responses[min(self.server.hits[self.path], len(responses)) - 1]
        time.sleep(delay)
        self.send_response(status)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up first
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    routes = {}
    for i, (fmt, size, mode) in enumerate(GOOD_IMAGES):
        routes[f"/img{i}.{EXT[fmt]}"] = [
            (200, {"Content-Type": f"image/{EXT[fmt]}"}, image_bytes(fmt, size, mode, i), 0)
        ]
    jpeg = image_bytes("JPEG", (64, 64))
    routes.update(
        {
            "/moved": [(302, {"Location": "/img0.jpg", "Content-Length": "0"}, b"", 0)],
            "/flaky.png": [(503, {}, b"busy", 0), routes["/img1.png"][0]],  # a retry gets it
            "/slow.png": [(200, {}, image_bytes("PNG", (20, 20)), 3.0)],  # beyond the timeout, every attempt
            "/page.html": [(200, {"Content-Type": "text/html"}, b"<html><body>an image was here</body></html>", 0)],
            "/truncated.jpg": [(200, {"Content-Type": "image/jpeg"}, jpeg[: len(jpeg) // 2], 0)],
            "/big.png": [(200, {}, bytes(300_000), 0)],  # says its length up front
            "/big-stream.png": [(200, {"Content-Length": None}, bytes(300_000), 0)],  # does not
        }
    )
    srv = LoopbackServer(routes)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(timeout=10)


def write_table(path: Path, base: str) -> dict[str, int]:
    """A JSONL table of what the server serves; returns the failures it should cause, by kind."""
    rows = [{"url": f"{base}/img{i}.{EXT[fmt]}", "caption": f"image {i}"} for i, (fmt, _, _) in enumerate(GOOD_IMAGES)]
    rows += [
        {"url": f"{base}/moved", "caption": "redirected"},
        {"url": f"{base}/flaky.png", "caption": "flaky"},
        {"url": f"{base}/gone.png", "caption": "gone"},
        {"url": f"{base}/also-gone.jpg", "caption": "gone too"},
        {"url": f"{base}/slow.png", "caption": "slow"},
        {"url": f"{base}/page.html", "caption": "a page"},
        {"url": f"{base}/truncated.jpg", "caption": "cut short"},
        {"url": f"{base}/big.png", "caption": "big"},
        {"url": f"{base}/big-stream.png", "caption": "big, streamed"},
        {"url": f"{base}/img2.png", "caption": ""},
        {"url": "", "caption": "no url"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"http_404": 2, "timeout": 1, "not_image": 1, "decode": 1, "too_large": 2, "caption": 1, "no_url": 1}


@pytest.mark.timeout(300)
def test_url_table_import_counts_every_failure_resumes_and_trains(tmp_path, server):
    failures = write_table(tmp_path / "urls.jsonl", server.base)
    overrides = settings(
        tmp_path,
        "data.source=urls",
        f"data.import_path={tmp_path / 'urls.jsonl'}",
        "data.num_train=40",
        "data.num_val=4",
        "data.samples_per_shard=8",
        "data.fetch.timeout_s=0.5",
        "data.fetch.retries=1",
        "data.fetch.max_bytes=100000",
        "data.fetch.workers=4",
    )
    cfg = load_config(TINY, overrides)
    manifest = prepare(cfg)
    fetch = manifest["fetch"]
    assert fetch["failed"] == failures and fetch["images"] == len(GOOD_IMAGES) + 2 == manifest["available"]
    assert (fetch["table_rows"], fetch["rows_fetched"], fetch["parts"]) == (25, 25, 4)
    assert manifest["splits"]["val"]["samples"] == 4 and manifest["splits"]["train"]["samples"] == 12
    assert server.hits["/flaky.png"] == 2 and server.hits["/slow.png"] == 2 and server.hits["/gone.png"] == 1

    # An interrupted import: one part lost its counts (it never finished). A rerun fetches only that part.
    parts = sorted(Path(fetch["directory"]).glob("part-*.json"))
    parts[1].unlink()
    order = np.random.default_rng(cfg.data.seed).permutation(25).tolist()
    table = [json.loads(line) for line in (tmp_path / "urls.jsonl").read_text().splitlines()]
    part_paths = {
        table[i]["url"].removeprefix(server.base) for i in order[8:16] if table[i]["url"] and table[i]["caption"]
    }
    before = Counter(server.hits)
    again = prepare(cfg, force=True)
    refetched = {path for path in server.hits if server.hits[path] > before[path]}
    assert refetched and refetched <= part_paths | {"/img0.jpg"}  # (where /moved points)
    assert (
        again["fetch"]["parts_resumed"] == 3
        and again["key"] == manifest["key"]
        and again["fetch"]["failed"] == failures
    )

    cache = cache_latents.main(["--config", str(TINY)] + [arg for item in overrides for arg in ("--set", item)])
    assert cache["splits"]["train"]["samples"] == 12
    losses = short_training(cfg)
    assert len(losses) == 3 and all(np.isfinite(losses))


def test_tables_in_laion_columns_and_other_formats_are_read(tmp_path):
    frame = pd.DataFrame({"URL": ["http://a/1.jpg", None], "TEXT": ["a cat", "a dog"], "WIDTH": [10, 20]})
    frame.to_parquet(tmp_path / "t.parquet")
    frame.to_csv(tmp_path / "t.csv", index=False)
    for name in ("t.parquet", "t.csv"):
        assert read_table(tmp_path / name, URL_COLUMNS) == (["http://a/1.jpg", ""], ["a cat", "a dog"])
    with pytest.raises(
        ValueError, match=r"needs a column url or URL and a caption column caption; it has \['URL', 'TEXT', 'WIDTH'\]"
    ):
        read_table(tmp_path / "t.csv", URL_COLUMNS, "caption")
    with pytest.raises(ValueError, match="expected a .csv, .jsonl or .parquet"):
        read_table(tmp_path / "t.tsv", URL_COLUMNS)
