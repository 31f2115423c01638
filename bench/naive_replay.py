"""A yardstick for replay time: the plainest Python replay of a journal, nothing checked.

    python bench/naive_replay.py DATA_DIR

Reads every segment line by line, parses each record with orjson and sets its
keys in a dict (a clear empties it, a delete pops): no checksum, no hash
chain, no ordered index. Prints the seconds it took. bench/replay.py runs it
pinned to one core next to each kvd start, so kvd's replay time can be given
as a multiple of it: a figure that holds across machines of different speed,
where the seconds do not.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import orjson


def naive_replay(directory: Path) -> dict:
    state: dict = {}
    for segment in sorted(directory.glob("[0-9]*.jsonl")):
        with open(segment, "rb") as lines:
            for line in lines:
                record = orjson.loads(line)
                if record["op"] == "clear":
                    state.clear()
                state.update(record.get("set") or ())
                for key in record.get("keys", ()) if record["op"] in ("delete", "expire") else ():
                    state.pop(key, None)
    return state


def main(argv: list[str]) -> int:
    started = time.perf_counter()
    state = naive_replay(Path(argv[0]))
    print(f"{time.perf_counter() - started:.3f} {len(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
