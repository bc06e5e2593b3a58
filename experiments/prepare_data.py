"""Write a dataset's train/val webdataset shards and manifest.

    python -m experiments.prepare_data --config C [--set data.source=webdataset ...] [--force]

Reads `data.source` (built-in scenes or an importer: docs/data.md), writes `data.root`/{train,val}-NNNNNN.tar
and manifest.json, which records what the import counted (items available, skipped by kind, fetch
failures by kind). Re-running with the same data config reuses what is there; --force rewrites it (a
URL import keeps the images it already fetched).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tqdm import tqdm

from mmdit_core.data.shards import encode_sample, read_manifest, write_dataset
from mmdit_core.data.sources import read_source

from .cli import config_parser, resolve_config, run_command


def prepare(cfg, force: bool = False) -> dict:
    data = cfg.data
    source = data.model_dump()
    root = Path(data.root)
    if not force and (root / "manifest.json").is_file():
        manifest = read_manifest(root)
        if manifest["source"] == source:
            print(f"{root} already holds this data (key {manifest['key']}); --force rewrites it")
            return manifest
    imported = read_source(data)

    def encoded(name: str, limit: int):  # a generator: its progress bar starts when writing reaches it
        for key, image, caption, attributes in tqdm(
            imported.splits[name], total=limit, desc=f"{name} samples", unit="img"
        ):
            yield encode_sample(key, image, caption, attributes)

    manifest = write_dataset(
        root,
        {"train": encoded("train", data.num_train), "val": encoded("val", data.num_val)},
        data.samples_per_shard,
        source,
        imported.summary,
    )
    counts = {name: entry["samples"] for name, entry in manifest["splits"].items()}
    offered = f" of {manifest['available']} available (a seeded random subset)" if "available" in manifest else ""
    skipped = imported.skipped.report(own_shards=False)
    print(f"wrote {root}: {json.dumps(counts)} samples{offered}, key {manifest['key']}; {skipped}")
    if (counts["train"], counts["val"]) != (data.num_train, data.num_val):
        print(
            f"warning: asked for data.num_train={data.num_train} and data.num_val={data.num_val}, but the source "
            f"had only {sum(counts.values())} usable samples: wrote {counts['train']} train + {counts['val']} val",
            file=sys.stderr,
        )
    return manifest


def main(argv=None) -> dict:
    parser = config_parser(__doc__)
    parser.add_argument("--force", action="store_true", help="rewrite the shards even if they match")
    args = parser.parse_args(argv)
    return prepare(resolve_config(args), args.force)


if __name__ == "__main__":
    run_command(main)
