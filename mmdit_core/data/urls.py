"""data.source=urls: a table of image URLs and captions, fetched into shards that an interrupted import
resumes from.

The table (CSV, JSONL or Parquet; LAION's URL / TEXT columns, or url / caption; sources.read_table) is
read whole and its rows put in a seeded random order. They are fetched in parts of
data.samples_per_shard rows, data.fetch.workers requests at a time, each bounded by data.fetch (timeout, retries, size cap) and
fitted to data.image_size as it arrives. A part is written as `part-NNNNNN.tar` (this project's shard
format), then its counts as `part-NNNNNN.json`: a part with its counts is finished, and a rerun never
fetches it again. Parts are fetched until num_train + num_val images are in hand or the table ends.
They live in `<data.root>_fetched/<plan key>/`; the plan key covers the table's bytes, its columns, the
seed, the image size and the part size, so parts of another plan are never mixed in.

A row that yields no image is counted by kind: http_<status>, timeout, connection, redirects, bad_url,
too_large, not_image (a body PIL does not know as an image, e.g. an HTML page), decode (an image that
does not decode, e.g. truncated), and, never requested, no_url and caption (empty).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import requests
import urllib3
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ..config import DataConfig, FetchConfig
from ..files import sha256_file
from .images import fit
from .shards import encode_sample

RETRY_STATUSES = (429, 500, 502, 503, 504)


def fetch_dir(cfg: DataConfig, table: Path) -> Path:
    plan = {"table": sha256_file(table), "caption_field": cfg.caption_field, "seed": cfg.seed,
            "image_size": cfg.image_size, "rows_per_part": cfg.samples_per_shard}
    key = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return Path(f"{cfg.root}_fetched") / key


# ---- one request --------------------------------------------------------------------------------

_local = threading.local()


def session(fetch: FetchConfig) -> requests.Session:
    """This thread's session: retries on timeouts, dropped connections, 429 and 5xx, with short backoff."""
    if getattr(_local, "session", None) is None:
        retry = urllib3.Retry(total=fetch.retries, connect=fetch.retries, read=fetch.retries, status=fetch.retries,
                              other=0, backoff_factor=0.1, status_forcelist=RETRY_STATUSES, allowed_methods={"GET"},
                              raise_on_status=False, respect_retry_after_header=False)
        _local.session = requests.Session()
        adapter = requests.adapters.HTTPAdapter(max_retries=retry)
        _local.session.mount("http://", adapter)
        _local.session.mount("https://", adapter)
    return _local.session


def failure_kind(exc: BaseException) -> str:
    """The kind of a failed request: a timeout anywhere in its chain of causes, else its family."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)):
            return "timeout"
        todo += [c for c in (e.__cause__, e.__context__, getattr(e, "reason", None), *e.args) if isinstance(c, BaseException)]
    if isinstance(exc, requests.TooManyRedirects):
        return "redirects"
    if isinstance(exc, (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                        requests.exceptions.InvalidSchema)):
        return "bad_url"
    return "connection"


def fetch_body(url: str, fetch: FetchConfig) -> tuple[bytes | None, str | None]:
    """The response body, or None and why not. The whole body must arrive within timeout_s."""
    try:
        with session(fetch).get(url, timeout=fetch.timeout_s, stream=True) as response:
            if response.status_code != 200:
                return None, f"http_{response.status_code}"
            if int(response.headers.get("Content-Length") or 0) > fetch.max_bytes:
                return None, "too_large"
            deadline, body = time.monotonic() + fetch.timeout_s, bytearray()
            for chunk in response.iter_content(1 << 16):
                body += chunk
                if len(body) > fetch.max_bytes:
                    return None, "too_large"
                if time.monotonic() > deadline:
                    return None, "timeout"
            return bytes(body), None
    except requests.RequestException as exc:
        return None, failure_kind(exc)


def fetch_image(url: str, cfg: DataConfig) -> tuple[Image.Image | None, str | None]:
    body, failure = fetch_body(url, cfg.fetch)
    if body is None:
        return None, failure
    try:
        image = Image.open(io.BytesIO(body))
    except (UnidentifiedImageError, Image.DecompressionBombError):
        return None, "not_image"
    try:
        return fit(image, cfg.image_size), None
    except Exception:  # truncated or corrupt image data: PIL raises many types
        return None, "decode"


# ---- the table, part by part --------------------------------------------------------------------

def fetch_part(path: Path, rows: list[tuple[int, str, str]], cfg: DataConfig, pool: ThreadPoolExecutor,
               progress: tqdm) -> dict[str, Any]:
    """Fetch rows (table index, url, caption) into the shard `path`, then write its counts beside it."""
    failed: Counter = Counter()
    images = 0
    partial = path.with_suffix(".tar.partial")
    with wds.TarWriter(str(partial), mtime=0) as writer:
        wanted = [(row, url, caption) for row, url, caption in rows if url and caption]
        failed.update("no_url" if not url else "caption" for _, url, caption in rows if not (url and caption))
        progress.update(len(rows) - len(wanted))
        for (row, url, caption), (image, failure) in zip(wanted, pool.map(lambda r: fetch_image(r[1], cfg), wanted)):
            progress.update()
            if image is None:
                failed[failure] += 1
            else:
                writer.write(encode_sample(f"row{row:09d}", image, caption, {"url": url, "row": row}))
                images += 1
    counts = {"rows": len(rows), "images": images, "failed": dict(failed)}
    os.replace(partial, path)
    path.with_suffix(".json.partial").write_text(json.dumps(counts))
    os.replace(path.with_suffix(".json.partial"), path.with_suffix(".json"))  # written last: the part is finished
    return counts


def fetch_table(cfg: DataConfig, table: Path, urls: list[str], captions: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Fetch the rows of `table` (its urls and captions) in seeded order, part by part, until enough
    images are in hand; finished parts are kept from any earlier run. Returns the parts' shard paths
    and what fetching counted."""
    order = np.random.default_rng(cfg.seed).permutation(len(urls)).tolist()
    directory = fetch_dir(cfg, table)
    directory.mkdir(parents=True, exist_ok=True)
    wanted, per_part = cfg.num_train + cfg.num_val, cfg.samples_per_shard
    parts, images, failed, resumed, rows_done = [], 0, Counter(), 0, 0
    progress = tqdm(total=min(len(order), -(-wanted // per_part) * per_part), desc="fetching", unit="url")
    with ThreadPoolExecutor(cfg.fetch.workers) as pool:
        for start in range(0, len(order), per_part):
            if images >= wanted:
                break
            path = directory / f"part-{start // per_part:06d}.tar"
            if path.is_file() and path.with_suffix(".json").is_file():
                counts = json.loads(path.with_suffix(".json").read_text())
                resumed += 1
                progress.update(counts["rows"])
            else:
                rows = [(i, urls[i], captions[i]) for i in order[start:start + per_part]]
                counts = fetch_part(path, rows, cfg, pool, progress)
            parts.append(str(path))
            images, rows_done = images + counts["images"], rows_done + counts["rows"]
            failed.update(counts["failed"])
            progress.set_postfix(images=images, failed=sum(failed.values()))
    progress.close()
    summary = {"table_rows": len(urls), "rows_fetched": rows_done, "images": images, "failed": dict(sorted(failed.items())),
               "parts": len(parts), "parts_resumed": resumed, "directory": str(directory)}
    print(f"fetched {images} images from {rows_done} of {len(urls)} rows ({resumed} parts from an earlier run); "
          f"failed: {', '.join(f'{n} {k}' for k, n in sorted(failed.items())) or 'none'}")
    return parts, summary
