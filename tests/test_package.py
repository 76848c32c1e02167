"""posprobe installed as a user installs it: from the wheel, into a fresh virtual environment, run elsewhere.

The wheel is built from a copy of the tracked files; the fresh environment reuses this one's
dependencies (a ``.pth`` line, so torch is not downloaded again) but gets posprobe only from the
wheel. Every command runs under an audit hook that fails on any file opened inside the checkout
(its ``.venv`` excepted): nothing may read the repo tree.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

GUARD = textwrap.dedent(
    """
    import os, runpy, sys
    ROOT, VENV = {root!r}, {venv!r}

    def guard(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if path.startswith(ROOT + os.sep) and not path.startswith(VENV + os.sep):
                raise RuntimeError(f"read the repo tree: {{path}}")

    sys.addaudithook(guard)
    sys.argv = sys.argv[1:]
    if sys.argv[0].endswith(".py"):
        runpy.run_path(sys.argv[0], run_name="__main__")
    else:
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    """
)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python, posprobe script, wheel) of a fresh venv holding posprobe from its wheel only."""
    tmp = tmp_path_factory.mktemp("package")
    source = tmp / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    wheels = tmp / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = [*pip, "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(wheels)]
    subprocess.run(build, check=True, capture_output=True)
    (wheel,) = wheels.glob("posprobe-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())  # fmt: skip
    (site / "_reuse_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # this venv's torch & co.
    # the fresh interpreter runs pip (reached through the .pth), so the script's shebang is its own;
    # --ignore-installed: pip must not uninstall the editable posprobe it sees through the .pth
    install = [str(python), *pip[1:], "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    here = subprocess.run([sys.executable, "-c", "import posprobe; print(posprobe.__file__)"], cwd=tmp,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert here == str(ROOT / "posprobe" / "__init__.py"), f"installing the wheel touched this environment: {here!r}"
    return python, venv / "bin" / "posprobe", wheel


def run(installed, tmp_path, *args: str, module: str = "posprobe") -> subprocess.CompletedProcess:
    """``python -m posprobe *args`` (or the script ``module``) in the fresh venv, in ``tmp_path``, under the guard."""
    python, _, _ = installed
    guard = tmp_path / "guard.py"
    venv = str(Path(sys.prefix).resolve())
    guard.write_text(GUARD.format(root=str(ROOT), venv=venv))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "POSPROBE_ZOO")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(
        [python, str(guard), module, *args], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900
    )


def test_the_wheel_carries_the_zoo(installed):
    import zipfile

    _, _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    for variant in ("none", "learned", "sinusoidal", "rope", "alibi", "p-rope"):
        assert f"posprobe/zoo_checkpoints/{variant}/model.safetensors" in names
    assert "posprobe/zoo_checkpoints/tokenizer.json" in names and "posprobe/py.typed" in names
    v2 = sum(f.stat().st_size for f in (ROOT / "posprobe" / "zoo_checkpoints" / "v2").glob("*/model.safetensors"))
    assert wheel.stat().st_size < 40e6 + v2 and v2 < 150e6  # the zoo v2 set stays under ~150 MB
    assert not [name for name in names if name.endswith(".pt")]  # a run's optimizer state stays out


def test_the_wheel_carries_the_zoo_v2_once_trained(installed):
    """Every tracked file of ``zoo_checkpoints/v2/<scheme>/`` is in the wheel (none while v2 is not trained)."""
    import zipfile

    _, _, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    listed = subprocess.run(["git", "ls-files", "posprobe/zoo_checkpoints/v2"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.split()  # fmt: skip
    shipped = [name for name in listed if name.endswith((".json", ".safetensors"))]
    assert not set(shipped) - names
    for folder in {Path(name).parent.as_posix() for name in shipped}:
        for part in ("config.json", "model.safetensors", "train_state.json"):
            assert f"{folder}/{part}" in names, f"the wheel lacks {folder}/{part}"


def test_package_data_globs_take_a_zoo_v2_checkpoint(tmp_path):
    """pyproject's package-data patterns, globbed as setuptools globs them, match v1 and v2 checkpoint files."""
    import glob
    import re

    pyproject = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[tool\.setuptools\.package-data\].*?^posprobe = \[(.*?)^\]", pyproject, re.S | re.M)[1]
    patterns = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert "py.typed" in patterns
    wanted = [f"zoo_checkpoints/{folder}/{name}" for folder in ("rope", "v2/rope", "v2/p-rope")
              for name in ("config.json", "model.safetensors", "train_state.json")]  # fmt: skip
    for name in [*wanted, "zoo_checkpoints/v2/rope/optimizer.pt"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    matched = {Path(p).relative_to(tmp_path).as_posix() for pattern in patterns
               for p in glob.glob(os.path.join(tmp_path, pattern), recursive=True)}  # fmt: skip
    assert set(wanted) <= matched and "zoo_checkpoints/v2/rope/optimizer.pt" not in matched


def test_models_and_zoo_load_outside_the_repo(installed, tmp_path):
    _python, script, _ = installed
    listed = subprocess.run([script, "models"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "zoo:rope" in listed.stdout and "smollm2-135m" in listed.stdout
    code = (
        "import posprobe as pp; m = pp.load_model('zoo:rope'); "
        "print(pp.__file__); print(m.info.name, m.info.n_layers, m.tokenizer.bos_token)"
    )
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    proc = run(installed, tmp_path, module=str(probe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    where, facts = proc.stdout.strip().splitlines()[-2:]
    assert not where.startswith(str(ROOT) + os.sep) and "site-packages" in where
    assert facts == "zoo:rope 4 <|bos|>"


def test_the_zoo_v2_loads_offline_from_the_wheel(installed, tmp_path):
    """Each v2 scheme as the checkout has it: a finished one loads and runs from the wheel, one still training or
    not started says so (ZooNotTrainedError with its step), and the two lists agree with the checkout's."""
    from posprobe.models.zoo import ZOO2_DIR, ZOO_VARIANTS, training_progress

    progress = {s: training_progress(ZOO2_DIR / s) for s in ZOO_VARIANTS}
    code = textwrap.dedent(
        """
        import json, torch, posprobe as pp
        from posprobe.models.zoo import ZOO_VARIANTS, ZooNotTrainedError
        out = {"listed": sorted(m for m in pp.known_models() if m.startswith("zoo2:"))}
        for scheme in ZOO_VARIANTS:
            try:
                m = pp.load_model(f"zoo2:{scheme}", device="cpu")
            except ZooNotTrainedError as err:
                out[scheme] = str(err)
                continue
            ids = torch.tensor([[m.tokenizer.bos_token_id, *m.tokenizer.encode("We the People of the United States")]])
            out[scheme] = [m.info.name, m.info.position_scheme, m.loss(ids).mean().item()]
        print(json.dumps(out))
        """
    )
    probe = tmp_path / "probe.py"
    probe.write_text(code)
    proc = run(installed, tmp_path, module=str(probe))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    finished = [s for s, p in progress.items() if p is not None and p[0] >= p[1]]
    assert out["listed"] == sorted(f"zoo2:{s}" for s in finished)
    for scheme, reached in progress.items():
        if scheme in finished:  # the same weights as the checkout's: the same loss on the same text
            import torch

            import posprobe as pp

            here = pp.load_model(f"zoo2:{scheme}", device="cpu")
            ids = torch.tensor(
                [[here.tokenizer.bos_token_id, *here.tokenizer.encode("We the People of the United States")]]
            )
            assert out[scheme][:2] == [f"zoo2:{scheme}", here.info.position_scheme]
            assert out[scheme][2] == pytest.approx(here.loss(ids).mean().item(), rel=1e-5)
        elif reached is None:
            assert "holds no checkpoint" in out[scheme]
        else:
            assert f"still training (step {reached[0]:,} of {reached[1]:,})" in out[scheme]


def test_quick_report_on_the_zoo_outside_the_repo(installed, tmp_path):
    proc = run(installed, tmp_path, "report", "--quick", "--model", "zoo:rope", "--n", "6", "--seq-len", "32",
               "--out", "r", "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert list(summary["models"]) == ["zoo:rope"]
    assert (tmp_path / "r" / "index.html").stat().st_size > 10_000


def test_a_trained_checkpoint_loads_by_path_and_from_posprobe_zoo(installed, tmp_path):
    tiny = ["--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-head", "16", "--d-mlp", "64", "--n-ctx", "32"]
    proc = run(installed, tmp_path, "train", "--pe", "alibi", "--steps", "2", "--eval-windows", "2", "--out",
               "mine/tiny", *tiny, "-q")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    described = run(installed, tmp_path, "models", "--model", "zoo:mine/tiny")
    assert described.returncode == 0, described.stderr[-3000:]
    assert json.loads(described.stdout)["position_scheme"] == "alibi"
    _python, script, _ = installed
    env = {**os.environ, "POSPROBE_ZOO": str(tmp_path / "mine"), "HF_HUB_OFFLINE": "1"}
    listed = subprocess.run([script, "models"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert "zoo:tiny" in listed.stdout, listed.stdout
    named = subprocess.run([script, "models", "--model", "zoo:tiny"], cwd=tmp_path, capture_output=True, text=True,
                           env=env, timeout=300)  # fmt: skip
    assert named.returncode == 0 and json.loads(named.stdout)["n_layers"] == 1, named.stderr


def test_the_guard_catches_a_read_of_the_repo(installed, tmp_path):
    """The audit hook is what makes the tests above able to fail: reading a file of the checkout stops the run."""
    peek = tmp_path / "peek.py"
    peek.write_text(f"open({str(ROOT / 'README.md')!r}).read()")
    proc = run(installed, tmp_path, module=str(peek))
    assert proc.returncode != 0 and "read the repo tree" in proc.stderr


#: declared dependencies that posprobe uses through another library rather than by importing them
INDIRECT = {
    "accelerate": "transformers' device_map loading",
    "gguf": "transformers' GGUF loader (Gemma 3 and SmolLM2 ship as GGUF)",
    "pyarrow": "pandas' to_parquet (the report's tables)",
}
IMPORT_NAMES = {"transformer-lens": "transformer_lens", "scikit-learn": "sklearn"}


def test_every_declared_dependency_is_used():
    import re

    block = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(), re.S | re.M)[1]
    declared = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert any(r.startswith("torch") for r in declared) and len(declared) > 10, declared
    source = "\n".join(p.read_text() for p in (ROOT / "posprobe").rglob("*.py"))
    for requirement in declared:
        name = re.match(r"[A-Za-z0-9_.-]+", requirement)[0]
        module = IMPORT_NAMES.get(name, name.replace("-", "_"))
        imported = re.search(rf"^\s*(import|from) {module}\b", source, re.MULTILINE)
        assert imported or name in INDIRECT, f"{name} is declared but posprobe never uses it"


def test_version_and_python_dash_m():
    import posprobe

    for argv in (["-m", "posprobe", "--version"], ["-m", "posprobe", "models"]):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
    version = subprocess.run([sys.executable, "-m", "posprobe", "--version"], capture_output=True, text=True)
    assert version.stdout.strip() == f"posprobe {posprobe.__version__}"
