"""`mgpt4-train --profile`: a torch.profiler trace of a few steps after warm-up.

Traces go to `RUN_DIR/profile/` (one Chrome/Perfetto JSON per rank, open in ui.perfetto.dev or
chrome://tracing) with a table of the top operators printed by rank 0.
"""
from __future__ import annotations

import os
from typing import Optional

import torch


class StepProfiler:
    """Profiles steps warmup+1 .. warmup+active; a no-op when disabled."""

    def __init__(self, run_dir: str, rank: int, enabled: bool, warmup: int = 2, active: int = 3):
        self.enabled, self.rank = enabled, rank
        self.out_dir = os.path.join(run_dir, "profile")
        self.profiler: Optional[torch.profiler.profile] = None
        if not enabled:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        os.makedirs(self.out_dir, exist_ok=True)
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=0, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._save, record_shapes=True, with_stack=False)
        self.profiler.start()

    def _save(self, prof) -> None:
        path = os.path.join(self.out_dir, f"trace_rank{self.rank}.json")
        prof.export_chrome_trace(path)
        if self.rank == 0:
            sort = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=15), flush=True)
            print(f"profile: wrote {path}", flush=True)

    def step(self) -> None:
        if self.profiler is not None:
            self.profiler.step()

    def stop(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
