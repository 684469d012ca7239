"""kernels/ ships as colreduce_kvprune.kernels (never a top-level `kernels`), in editable and plain installs; a
source checkout imported ahead of the installed copy says so."""
import pathlib
import subprocess
import sys
import zipfile

import colreduce_kvprune.kernels.colreduce as kernel_module

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_import_as_subpackage():
    assert pathlib.Path(kernel_module.__file__).name == "colreduce.py"
    assert pathlib.Path(kernel_module.__file__).parent.name == "kernels"


def test_plain_install_ships_kernels_inside_the_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("colreduce_kvprune-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("colreduce_kvprune/kernels/colreduce.py", "colreduce_kvprune/vllm/__init__.py",
                     "colreduce_kvprune/sglang/__init__.py", "colreduce_kvprune/configs/snapkv.yaml"):
        assert required in names, required
    shipped = {n.rsplit("/", 1)[1] for n in names if n.startswith("colreduce_kvprune/configs/")}
    assert shipped >= {p.name for p in (REPO / "configs").glob("*.yaml")}
    assert not any(n.startswith("kernels/") for n in names), "a top-level `kernels` package would shadow others"
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    for group, target in (("vllm.general_plugins", "colreduce_kvprune.vllm:register"),
                          ("vllm.logits_processors", "colreduce_kvprune.vllm.prompt_lengths:PromptLengthTracker"),
                          ("sglang.srt.plugins", "colreduce_kvprune.sglang:register")):
        section = entry_points.split(f"[{group}]", 1)[1].split("[", 1)[0]
        assert target in section, (group, entry_points)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    probe = ("import colreduce_kvprune.kernels.colreduce as m, colreduce_kvprune as p, importlib.resources as r; "
             "print(m.__file__); print(p.__file__); "
             "print(r.files('colreduce_kvprune.configs').joinpath('snapkv.yaml'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.split()
    assert all(path.startswith(str(site)) for path in out), out


def test_a_source_checkout_first_on_sys_path_names_the_missing_kernels(tmp_path):
    # The source tree's colreduce_kvprune has no kernels subpackage; `python -m` from the repository root imports it
    # ahead of an installed copy (this stopped the serving benchmark's vLLM server at start on the H200). Without
    # site (-S) there is no editable-install finder to paper over it, as with a regular install.
    import shutil

    import torch

    shutil.copytree(REPO / "colreduce_kvprune", tmp_path / "colreduce_kvprune",
                    ignore=shutil.ignore_patterns("__pycache__", "kernels"))
    probe = ("import colreduce_kvprune, colreduce_kvprune.ops as o\n"
             "print(colreduce_kvprune.__file__)\n"
             "try:\n    o.kernels_module('colreduce')\nexcept ModuleNotFoundError as e:\n    print('ERROR', e.name, e)\n")
    site = pathlib.Path(torch.__file__).parents[1]
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    first, error = out.stdout.splitlines()[:2]
    assert first.startswith(str(tmp_path))                                  # the shadowing copy was imported
    assert error.startswith("ERROR colreduce_kvprune.kernels ")
    assert "source checkout" in error and str(tmp_path / "colreduce_kvprune") in error and "-P" in error
