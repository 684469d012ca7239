"""kernels/ ships as colreduce_kvprune.kernels (never a top-level `kernels`), in editable and plain installs."""
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
