"""Every environment hook the test suite uses to reach inside a real run, in one place.

None of them changes what a run computes; each is off unless its variable is set, and none is a
user-facing setting (they are not config keys and the README does not offer them):

- MGPT4_TEST_SAVE_PAUSE=STEP:SECONDS  sleep inside the save of STEP, between the engine's files and
  the rename into place, so a test can kill -9 the job while a checkpoint is half written;
- MGPT4_TEST_HANG=RANK:STEP           that rank stops answering as it starts STEP (the hung-rank error);
- MGPT4_ENGINE_REPORT=DIR             each rank writes what it measured: `rank{R}.json` (parameter
  bytes it holds once wrapped) and `build_rank{R}.json` (the most parameter bytes it held while the
  model was built, and the whole model's).

A leaf: the standard library only, so any module may call it.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, Tuple

SAVE_PAUSE_ENV = "MGPT4_TEST_SAVE_PAUSE"
HANG_ENV = "MGPT4_TEST_HANG"
ENGINE_REPORT_ENV = "MGPT4_ENGINE_REPORT"


def pause_in_save(step: int) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV, "")
    if spec and int(spec.split(":")[0]) == step:
        print(f"{SAVE_PAUSE_ENV}: pausing in save of step {step}", flush=True)
        time.sleep(float(spec.split(":")[1]))


def hang_point() -> Optional[Tuple[int, int]]:
    """(rank, step) of MGPT4_TEST_HANG, or None."""
    value = os.environ.get(HANG_ENV)
    if not value:
        return None
    try:
        rank, step = (int(x) for x in value.split(":"))
    except ValueError:
        raise ValueError(f"{HANG_ENV}={value!r}: expected RANK:STEP, e.g. {HANG_ENV}=1:3") from None
    return rank, step


def hang_if_asked(rank: int, step: int, where: str) -> None:
    """Never returns when MGPT4_TEST_HANG names this rank and step."""
    if hang_point() != (rank, step):
        return
    print(f"[test] {HANG_ENV}: rank {rank} on {where} (pid {os.getpid()}) stops answering at step {step}",
          file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)


def engine_report_enabled() -> bool:
    return bool(os.environ.get(ENGINE_REPORT_ENV))


def write_engine_report(name: str, rank: int, values: dict) -> None:
    """MGPT4_ENGINE_REPORT=DIR: write `values` to DIR/{name}{rank}.json; nothing when unset."""
    out = os.environ.get(ENGINE_REPORT_ENV)
    if not out:
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"{name}{rank}.json"), "w") as f:
        json.dump(values, f)
