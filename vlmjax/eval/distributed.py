"""Distributed evaluation: each process of a multi-process run (vlmjax.sharding.initialize_distributed) takes every
count-th question from its index on, writes its own resumable records shard beside the results file, and process 0
merges the shards in the questions' order once every process is done, so that the merged file equals a
single-process run's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from vlmjax.errors import VlmJaxError
from vlmjax.eval.records import ResultsWriter


def shard_path(out_path: str | Path, index: int, count: int) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}.part-{index:03d}-of-{count:03d}{out_path.suffix}")


def share(items: Sequence, index: int, count: int) -> list:
    """This process's questions: every count-th one from its index on (a balanced mix of every split)."""
    return list(items[index::count])


def merge(out_path: str | Path, ids: Sequence, count: int) -> list[dict]:
    """Write the shards' records to `out_path` in the order of `ids` (appending what it lacks); its records."""
    by_id = {}
    for index in range(count):
        part = shard_path(out_path, index, count)
        if not part.is_file():
            raise VlmJaxError(f"{part} is missing: process {index} of {count} has not written its records.")
        for line in part.read_text().splitlines():
            record = json.loads(line)
            by_id[record["id"]] = record
    absent = [i for i in ids if i not in by_id]
    if absent:
        raise VlmJaxError(f"The shards lack {len(absent)} of the questions (first: {absent[0]!r}); rerun the same "
                          "command on every process to finish them.")
    with ResultsWriter(str(out_path), id_key="id") as writer:
        for i in writer.pending(list(ids)):
            writer.write(by_id[i])
        return writer.records
