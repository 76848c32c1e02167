"""One way in: devices and layers are resolved the same way by every analysis (negative layers everywhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids

import posprobe as pp
from posprobe.sites import LayerOutOfRange, check_layer_range, resolve_stored_layers


def test_negative_layers_read_a_store_in_every_analysis(tiny_llama, tmp_path):
    tokens = random_ids(6, 12)
    store = pp.extract(tiny_llama, tokens, ["resid_post", "mlp_post", "pattern"], out=tmp_path / "s", progress=False)
    last = pp.probe_position(store, layers=-1, n_splits=2, device="cpu", controls=())
    assert last.table["layer"].unique().tolist() == [2]
    assert pp.positional_neurons(store, layers=[-1], device="cpu").table["layer"].unique().tolist() == [2]
    assert pp.attention_stats(store, layers=-1).heads["layer"].unique().tolist() == [2]
    assert pp.attention_stats(tiny_llama, tokens, layers=-1).heads["layer"].unique().tolist() == [2]
    for call in (
        lambda: pp.probe_position(store, layers=[5], device="cpu"),
        lambda: pp.positional_neurons(store, layers=[5], device="cpu"),
        lambda: pp.attention_stats(store, layers=[5]),
    ):
        with pytest.raises(
            LayerOutOfRange, match=r"^layers \[5\] of '\w+' are not in the store; stored layers: \[0, 1, 2\]$"
        ):
            call()


def test_layer_resolution_rules():
    assert check_layer_range([0, -1, -3], 3) == [0, 2, 0]
    with pytest.raises(LayerOutOfRange, match=r"^layer 3 out of range; this model has layers 0\.\.2$"):
        check_layer_range([3], 3)
    with pytest.raises(LayerOutOfRange, match="not an integer"):
        check_layer_range([1.0], 3)
    assert check_layer_range([torch.tensor(1).numpy()], 3) == [1]  # numpy integers are layers too
    assert resolve_stored_layers("resid_post", None, [0, 2], 3) == [0, 2]
    assert resolve_stored_layers("resid_post", -1, [0, 2], 3) == [2]
    with pytest.raises(LayerOutOfRange, match=r"layers \[-2\] of 'resid_post' are not in the store"):
        resolve_stored_layers("resid_post", [-2], [0, 2], 3)  # -2 is layer 1, not stored


def test_one_device_resolution_everywhere(tiny_llama):
    acts = torch.randn(1, 4, 8, 6)
    with pytest.raises(ValueError, match="unknown device 'tpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        pp.probe_position(acts, device="tpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'; use 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        pp.positional_neurons(acts[0], device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            pp.probe_position(acts, device="cuda")


def test_no_module_shadows_a_public_function():
    """Importing any posprobe module never turns pp.<name> into a module (it once did for report and train)."""
    import importlib
    import pkgutil
    import types

    for info in pkgutil.walk_packages(pp.__path__, "posprobe."):
        if info.name != "posprobe.__main__":  # that one runs the command line
            importlib.import_module(info.name)
    for name in pp.__all__:
        assert not isinstance(getattr(pp, name), types.ModuleType) or name == "data", name
    assert callable(pp.report) and callable(pp.train) and callable(pp.extract)


def test_dir_lists_the_lazily_loaded_analyses_and_device_defaults_agree():
    import inspect

    assert {"probe_position", "attention_stats", "positional_neurons", "train"} <= set(dir(pp))
    defaults = {
        name: inspect.signature(fn).parameters["device"].default
        for name, fn in {
            "load_model": pp.load_model,
            "extract": pp.extract,
            "probe_position": pp.probe_position,
            "positional_neurons": pp.positional_neurons,
            "report": pp.report,
        }.items()
        if "device" in inspect.signature(fn).parameters
    }
    assert set(defaults.values()) == {"auto"}, defaults


def test_probe_position_shows_progress_when_asked(capsys):
    acts = torch.randn(2, 6, 8, 4)
    pp.probe_position(acts, device="cpu", n_splits=2, controls=(), progress=True)
    assert "probe resid_post" in capsys.readouterr().err
    pp.probe_position(acts, device="cpu", n_splits=2, controls=())
    assert "probe resid_post" not in capsys.readouterr().err
