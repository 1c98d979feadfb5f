"""Packaging: what `pip install .` (non-editable) gives a user.

A wheel is built from a copy of the source tree and checked for its package data (the DeepSpeed
templates, the shipped configs, the console scripts); it is installed into a fresh venv that sees
this environment's torch, DeepSpeed, ... through a .pth line (no second copy), and the quickstart's
training (tiny assets, 2 processes, deepspeed launcher, a few steps) runs from a folder outside the
repository with the installed package only: its RUN_DIR/ds_config.json must come from the shipped
ZeRO template. A fast check that every third-party import of the package is declared in setup.py.
"""
import ast
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from helpers import BIN, REPO, free_port, read_metrics
from package_imports import third_party_imports

# Import name -> distribution name, where they differ or the import is an optional extra's.
DISTRIBUTIONS = {"yaml": "pyyaml", "PIL": "pillow"}
OPTIONAL = {"flash_attn": "flash", "bitsandbytes": None, "gradio": "demo", "pycocoevalcap": "eval"}  # extras, or found at run time when asked for


def setup_requirements() -> tuple:
    """(install_requires, extras_require) of setup.py, read without running it."""
    tree = ast.parse(open(os.path.join(REPO, "setup.py")).read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords
              if k.arg in ("install_requires", "extras_require")}
    return kwargs["install_requires"], kwargs.get("extras_require", {})


def requirement_name(spec: str) -> str:
    for sep in ("[", "<", ">", "=", "!", "~", ";", " "):
        spec = spec.split(sep)[0]
    return spec.strip().lower()


def test_every_third_party_import_is_declared():
    required, extras = setup_requirements()
    declared = {requirement_name(r) for r in required}
    in_extras = {requirement_name(r) for reqs in extras.values() for r in reqs}
    imports = {name: users for name, users in third_party_imports(REPO).items()
               if name not in sys.stdlib_module_names and name not in ("__future__",)}
    missing = []
    for name, users in sorted(imports.items()):
        dist = DISTRIBUTIONS.get(name, name).lower().replace("_", "-")
        if name in OPTIONAL:
            extra = OPTIONAL[name]
            assert extra is None or dist in in_extras, f"{name}: expected in the {extra!r} extra"
            continue
        if dist not in declared:
            missing.append(f"{name} (distribution {dist}, imported by {sorted(users)[:3]})")
    assert not missing, "imported but not in setup.py install_requires: " + "; ".join(missing)
    # Floors are the versions the suite runs on.
    import transformers

    floor = next(r for r in required if requirement_name(r) == "transformers").split(">=")[1]
    assert int(floor.split(".")[0]) >= 5 and int(transformers.__version__.split(".")[0]) >= int(floor.split(".")[0])


def _copy_source(dst: str) -> None:
    """The files a source checkout has (no .git, venv, caches or earlier build output)."""
    shutil.copytree(REPO, dst, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    src, out = str(work / "src"), str(work / "dist")
    _copy_source(src)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", out, src], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
    return os.path.join(out, name)


def test_wheel_ships_templates_configs_and_scripts(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for stage in range(4):
            entry = f"mgpt4_dist/ds_configs/zero{stage}.json"
            assert entry in names, entry
            shipped = json.loads(z.read(entry))
            with open(os.path.join(REPO, "mgpt4_dist", "ds_configs", f"zero{stage}.json")) as f:
                assert shipped == json.load(f) and shipped["zero_optimization"]["stage"] == stage
        assert {"mgpt4_dist/configs/tiny_stage1.yaml", "mgpt4_dist/configs/tiny_stage2.yaml"} <= names
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for script in ("mgpt4-train", "mgpt4-export", "mgpt4-consolidate", "mgpt4-make-tiny-assets"):
        assert f"{script} = " in entry_points, script
    for dist in ("braceexpand", "tqdm", "numpy", "torchvision"):
        assert f"Requires-Dist: {dist}" in metadata, dist
    # Only the package (and its data) is installed: no tests, tools or launch scripts.
    assert not [n for n in names if n.startswith(("tests/", "tools/", "launch/"))]


@pytest.mark.slow
@pytest.mark.distributed
def test_installed_wheel_trains_the_quickstart_with_the_shipped_templates(wheel, tmp_path):
    venv = str(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = os.path.join(venv, "bin", "python")
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # This environment's packages (torch, DeepSpeed, pip, ...) without a second copy: a path line in a
    # .pth file. Only the directory is added: its own .pth files (an editable mgpt4_dist) are not run.
    with open(os.path.join(site, "suite_env.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "PATH": os.path.join(venv, "bin") + os.pathsep
                + env.get("PATH", "")})
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], capture_output=True,
                          text=True, timeout=300, env=env, cwd=str(outside))
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = subprocess.run([py, "-c", "import mgpt4_dist, os; print(os.path.dirname(mgpt4_dist.__file__))"],
                           capture_output=True, text=True, check=True, env=env, cwd=str(outside)).stdout.strip()
    assert where == os.path.join(site, "mgpt4_dist"), where  # the installed copy, not the checkout

    # The quickstart's steps (launch/quickstart.sh), with the installed scripts and package data.
    assets = subprocess.run([os.path.join(venv, "bin", "mgpt4-make-tiny-assets"), "--out", str(tmp_path / "assets")],
                            capture_output=True, text=True, timeout=600, env=env, cwd=str(outside))
    assert assets.returncode == 0, assets.stderr[-3000:]
    overrides = next(line for line in assets.stdout.splitlines() if line.startswith("overrides: ")).split()[1:]
    run_dir = tmp_path / "run"
    # The deepspeed launcher starts each rank with the interpreter that runs it: the venv's.
    proc = subprocess.run([py, os.path.join(BIN, "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
                           "--module", "mgpt4_dist.train", "--config", os.path.join(where, "configs", "tiny_stage1.yaml"),
                           f"run_dir={run_dir}", *overrides, "train.max_steps=3", "train.log_every=1",
                           "checkpoint.every_steps=3"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=str(outside))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert [m["step"] for m in read_metrics(str(run_dir))] == [1, 2, 3]
    with open(run_dir / "ds_config.json") as f:
        written = json.load(f)
    with open(os.path.join(where, "ds_configs", "zero2.json")) as f:
        template = json.load(f)
    # Every setting of the shipped ZeRO-2 template (bucket sizes, overlap, ...) reached DeepSpeed.
    for key, value in template["zero_optimization"].items():
        assert written["zero_optimization"][key] == value, key
    assert written["zero_optimization"]["reduce_bucket_size"] == 500000000
    assert written["steps_per_print"] == template["steps_per_print"]
    assert written["train_batch_size"] == written["train_micro_batch_size_per_gpu"] * written["gradient_accumulation_steps"] * 2
