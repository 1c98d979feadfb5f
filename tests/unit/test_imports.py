"""The package's import structure, read from the source with `ast`: every import statement counts,
also those inside functions and under `if TYPE_CHECKING:` (moving an import into a function
delays it, it does not remove the dependency).

- no import cycles among mgpt4_dist modules;
- `deepspeed` is imported only under mgpt4_dist/parallel/;
- mgpt4_dist/models/ imports nothing from checkpointing, export, parallel/ or the train loop.
"""
from __future__ import annotations

import os

import pytest

from package_imports import PACKAGE, REPO, find_cycle, import_graph, third_party_imports

# --------------------------------------------------------------------------- the rules

def test_no_import_cycles():
    cycle = find_cycle(import_graph(REPO))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_deepspeed_only_in_parallel():
    users = third_party_imports(REPO).get("deepspeed", set())
    outside = sorted(m for m in users if not m.startswith(f"{PACKAGE}.parallel"))
    assert not outside, f"deepspeed imported outside {PACKAGE}/parallel/: {outside}"


FORBIDDEN_FOR_MODELS = (f"{PACKAGE}.checkpoint", f"{PACKAGE}.export", f"{PACKAGE}.parallel", f"{PACKAGE}.train",
                        f"{PACKAGE}.consolidate", f"{PACKAGE}.trainable_state", f"{PACKAGE}.run_dir")


def test_models_import_no_training_layer():
    graph = import_graph(REPO)
    bad = sorted(f"{m} imports {e}" for m, edges in graph.items() if m.startswith(f"{PACKAGE}.models")
                 for e in edges if any(e == f or e.startswith(f + ".") for f in FORBIDDEN_FOR_MODELS))
    assert not bad, "models/ reaches into checkpointing, export, parallel or the train loop: " + "; ".join(bad)


# --------------------------------------------------------------------------- the checker itself can fail

def _write(root, rel: str, text: str) -> None:
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_checker_finds_a_cycle_through_a_function_local_import(tmp_path):
    _write(tmp_path, f"{PACKAGE}/__init__.py", "")
    _write(tmp_path, f"{PACKAGE}/a.py", f"from {PACKAGE}.b import x\n")
    _write(tmp_path, f"{PACKAGE}/b.py", "x = 1\ndef f():\n    from . import a\n")
    _write(tmp_path, f"{PACKAGE}/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                        f"    import {PACKAGE}.a\n")
    graph = import_graph(str(tmp_path))
    assert graph[f"{PACKAGE}.c"] == {f"{PACKAGE}.a"}
    assert find_cycle(graph) == [f"{PACKAGE}.a", f"{PACKAGE}.b", f"{PACKAGE}.a"]
    assert third_party_imports(str(tmp_path)).get("typing") == {f"{PACKAGE}.c"}


@pytest.mark.parametrize("text", ["import deepspeed\n", "def f():\n    from deepspeed.utils import x\n"])
def test_checker_sees_deepspeed_anywhere(tmp_path, text):
    _write(tmp_path, f"{PACKAGE}/__init__.py", "")
    _write(tmp_path, f"{PACKAGE}/models/__init__.py", text)
    assert third_party_imports(str(tmp_path))["deepspeed"] == {f"{PACKAGE}.models"}
