"""The `hobbit` command's shape: one set of run flags on every command (from RunConfig), `--json`
alike everywhere, `hobbit --help` without torch, a clear message for a missing extra; RunConfig
resolves as the engine runs."""
from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

import pytest

from hobbit.cli import COMMANDS, HELP, build_parser, main
from hobbit.runtime.config import RunConfig, StoreFacts, resolve

ENGINE_COMMANDS = ("run", "serve", "eval", "bench", "tune", "chat", "profile")
SCHEDULE_COMMANDS = ENGINE_COMMANDS + ("simulate",)
JSON_COMMANDS = ("run", "eval", "bench", "simulate", "tune", "profile", "demo")


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def flags(p: argparse.ArgumentParser) -> dict[str, tuple]:
    """option string -> (dest, default, choices, nargs, const) of every optional flag."""
    return {s: (a.dest, a.default, tuple(a.choices or ()), a.nargs, a.const)
            for a in p._actions if a.option_strings for s in a.option_strings if s.startswith("--")}


PARSERS = subparsers(build_parser())
RUN_FLAGS = {s: v for s, v in flags(PARSERS["run"]).items()
             if v[0] in {f.name for f in dataclasses.fields(RunConfig)} | {"weights"}}
ENGINE_FLAGS = {s for s, v in RUN_FLAGS.items()
                if dataclasses.fields(RunConfig) and v[0] in {f.name for f in dataclasses.fields(RunConfig)
                                                               if f.metadata["group"] == "engine"}}


def test_run_flags_come_from_runconfig():
    names = {f.metadata["flag"] for f in dataclasses.fields(RunConfig)}
    assert set(RUN_FLAGS) == names and len(names) == len(dataclasses.fields(RunConfig))
    defaults = {f.metadata["flag"]: f.default for f in dataclasses.fields(RunConfig)}
    # what the flags default to is what RunConfig defaults to (--weights: no eviction options)
    assert all(RUN_FLAGS[s][1] == defaults[s] for s in names if s != "--weights")
    assert RunConfig.from_args(PARSERS["run"].parse_args(["store", "--prompt", "x"])) == RunConfig()


@pytest.mark.parametrize("command", SCHEDULE_COMMANDS)
def test_every_command_takes_the_same_run_flags_with_the_same_defaults(command):
    got = flags(PARSERS[command])
    want = {s: v for s, v in RUN_FLAGS.items() if command != "simulate" or s not in ENGINE_FLAGS}
    if command == "bench":  # bench sweeps: --budget, --policy (alias --policies) and MoBiLE's knobs take comma lists
        lists = ("--gamma", "--fallback-prefetch", "--little-weights")
        want = {s: v for s, v in want.items() if s not in ("--budget", "--policy", *lists)}
        assert got["--budget"][1] == "10%,25%,50%" and got["--policy"][0] == "policies"
        assert all(got[s][1:3] == (None, ()) for s in lists)
    assert {s: got.get(s) for s in want} == want
    if command == "simulate":
        assert not ENGINE_FLAGS & set(got), "simulate has no model: no engine flags"


@pytest.mark.parametrize("command", JSON_COMMANDS)
def test_json_means_the_same_everywhere(command):
    assert flags(PARSERS[command])["--json"] == ("json", None, (), "?", "-")


def test_help_lines_are_the_commands_own():
    """`hobbit --help` lists every command with the help line its full parser has."""
    full = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    listed = next(a for a in build_parser("")._actions if isinstance(a, argparse._SubParsersAction))
    full_help = {c.dest: c.help for c in full._choices_actions}
    assert {c.dest: c.help for c in listed._choices_actions} == full_help == HELP
    assert set(HELP) == set(COMMANDS)


def test_help_does_not_import_torch():
    code = ("import sys\nfrom hobbit.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'hobbit --help imported torch'\n"
            "try:\n    main(['simulate', '--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'hobbit simulate --help imported torch'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "usage: hobbit" in done.stdout and "simulate" in done.stdout


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_extra_names_it(tiny_store, monkeypatch, capsys, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    assert main(["serve", str(tiny_store)]) == 2
    err = capsys.readouterr().err
    assert f"needs {missing}" in err and "pip install 'hobbit-moe[serve]'" in err and "Traceback" not in err


def test_torch_dtypes_are_accepted_like_their_names(tiny_store):
    import torch

    import hobbit
    for dtype, name in ((torch.float32, "fp32"), ("float32", "fp32"), (torch.bfloat16, "bf16")):
        assert RunConfig(dtype=dtype).dtype == name
        assert RunConfig(dense=dtype).dense == name and RunConfig(high=dtype).high == name
    with hobbit.load(tiny_store, policy="resident", dtype=torch.float32) as eng:
        assert eng.dtype == torch.float32 and eng.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="dtype 'float16': choose bf16 or fp32"):
        hobbit.load(tiny_store, policy="resident", dtype=torch.float16)


FACTS = StoreFacts(("bf16", "int8", "int4", "int2"), total_bytes=1000, num_experts=8)
TUNED = {"options": {"t1": 0.3, "t2": 0.8, "low_pool_fraction": 0.4, "eviction_options": {"weights": {"lru": 1.0}}},
         "calibration": {"high": "bf16", "low": "int4"}, "budget_bytes": 250}


def test_resolve_settles_defaults_budget_and_tuned_options():
    r = resolve(RunConfig(policy="hobbit", budget="25%"), FACTS, [TUNED])
    o = r.options
    assert (o.high, o.low, r.budget_bytes, r.tuned) == ("bf16", "int4", 250, True)
    assert (o.t1, o.t2, o.low_pool_fraction, o.eviction_options) == (0.3, 0.8, 0.4, {"weights": {"lru": 1.0}})
    explicit = resolve(RunConfig(policy="hobbit", t2=0.95), FACTS, [TUNED]).options  # explicit knobs win
    assert (explicit.t1, explicit.t2) == (0.3, 0.95)
    other = resolve(RunConfig(policy="hobbit", low="int2"), FACTS, [TUNED])  # tuned for bf16+int4, not bf16+int2
    assert not other.tuned and (other.options.t1, other.options.t2) == (0.6, 0.9) and "hobbit tune" in other.note
    assert resolve(RunConfig(policy="hobbit", budget=270), FACTS, [TUNED]).tuned  # within 10% of the tuned budget
    far = resolve(RunConfig(policy="hobbit", budget="50%"), FACTS, [TUNED])  # tuned at 25%: not for 50%
    assert not far.tuned and far.options.t1 == 0.6 and "--budget" in far.note
    assert not resolve(RunConfig(policy="hobbit", tuned=False), FACTS, [TUNED]).tuned
    assert not resolve(RunConfig(policy="lru"), FACTS, [TUNED]).tuned  # tuned options are hobbit's only
    assert resolve(RunConfig(policy="ondemand"), FACTS).budget_bytes is None
    dense = resolve(RunConfig(policy="hobbit"), StoreFacts(("bf16",), 0, 0))  # no experts: nothing to offload
    assert dense.options.policy == "resident" and dense.budget_bytes is None
    with pytest.raises(ValueError, match="t1 must be a number in"):
        resolve(RunConfig(policy="hobbit"), FACTS, [{**TUNED, "options": {"t1": "high"}}])


def test_resolve_keeps_quantized_source_experts_at_their_precision_untuned():
    """A store whose experts came as int4 (a Q4 GGUF): untuned, policy hobbit sends nothing to its int2 tier
    (t1 = t2 = 1, with a note saying why and what to do); explicit thresholds, a tuning result, a low tier at
    or above the source's precision, other policies and full-precision sources keep the usual defaults."""
    q4 = StoreFacts(("int4", "int2"), total_bytes=1000, num_experts=8, source_precision="int4")
    r = resolve(RunConfig(policy="hobbit"), q4)
    assert (r.options.low, r.options.t1, r.options.t2, r.tuned) == ("int2", 1.0, 1.0, False)
    assert "came as int4" in r.note and "hobbit tune" in r.note and "--t1" in r.note
    assert resolve(RunConfig(policy="hobbit+mobile"), q4).options.t1 == 1.0
    asked = resolve(RunConfig(policy="hobbit", t1=0.7), q4)
    assert (asked.options.t1, asked.options.t2, asked.note) == (0.7, 0.9, None)
    tuned = {**TUNED, "calibration": {"high": "int4", "low": "int2"}}
    assert resolve(RunConfig(policy="hobbit", budget="25%"), q4, [tuned]).options.t1 == 0.3
    assert resolve(RunConfig(policy="hobbit", budget="25%"), q4, [tuned]).note is None
    far = resolve(RunConfig(policy="hobbit", budget="90%"), q4, [tuned])  # a result for another budget: both notes
    assert far.options.t1 == 1.0 and "--budget" in far.note and "came as int4" in far.note
    wide = StoreFacts(("int8", "int4", "int2"), 1000, 8, source_precision="int4")  # int8 above, int4 = the source
    assert (resolve(RunConfig(policy="hobbit"), wide).options.t1, resolve(RunConfig(policy="hobbit"), wide).note) \
        == (0.6, None)
    assert resolve(RunConfig(policy="hobbit", low="int2"), wide).options.t1 == 1.0
    assert resolve(RunConfig(policy="hobbit"), FACTS).options.t1 == 0.6  # a full-precision source
    assert resolve(RunConfig(policy="lru"), q4).note is None


def test_resolve_little_weights_follow_the_family_router():
    """A little set's weights are rescaled to the top-k's total where the family renormalizes its top-k
    (or the user asks for it), else kept as the router gives them."""
    plain = dataclasses.replace(FACTS, norm_topk_prob=False)
    assert resolve(RunConfig(policy="mobile"), FACTS).options.little_renorm
    assert not resolve(RunConfig(policy="mobile"), plain).options.little_renorm
    assert resolve(RunConfig(policy="mobile", little_weights="rescaled"), plain).options.little_renorm
    assert not resolve(RunConfig(policy="lru", little=0.8, little_weights="router"), plain).options.little_renorm
    with pytest.raises(ValueError, match="unknown little weights 'scaled'; choose from router, rescaled"):
        resolve(RunConfig(policy="mobile", little_weights="scaled"), plain)


def test_json_prints_or_writes(tiny_store, tmp_path, capsys):
    """Bare --json: one JSON object and nothing else on stdout; --json FILE: the same object in FILE and
    the human summary on stdout."""
    import json
    common = ["--policy", "lru", "--budget", "50%", "--json"]
    assert main(["profile", str(tiny_store), "--prompt-tokens", "4", "--tokens", "2", *common]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["policy"] == "lru" and "attention" in printed["ms_per_token"]
    out = tmp_path / "profile.json"
    assert main(["profile", str(tiny_store), "--prompt-tokens", "4", "--tokens", "2", *common, str(out)]) == 0
    summary = capsys.readouterr().out
    assert json.loads(out.read_text()).keys() == printed.keys() and "policy lru, budget 50%" in summary
    assert main(["run", str(tiny_store), "--prompt-ids", "3,17,42", "--max-new-tokens", "4", *common, str(out)]) == 0
    summary = capsys.readouterr().out
    assert "[length] policy lru" in summary or "[stop] policy lru" in summary
    from hobbit import kernels
    assert (f"hobbit's {kernels.variant()} build" if kernels.available() else "torch's (no AVX2") in summary
    written = json.loads(out.read_text())
    assert written["prompt_ids"] == [3, 17, 42] and written["native_kernels"] == kernels.variant()


def test_tune_refuses_the_knobs_it_searches(tiny_store, capsys):
    for extra in (["--t1", "0.5"], ["--weights", "lru=1", "--policy", "hobbit"], ["--policy", "lfu"], ["--gamma", "0.5"],
                  ["--little-weights", "rescaled"]):
        assert main(["tune", str(tiny_store), *extra]) == 2
        assert "hobbit tune records with policy lru and searches" in capsys.readouterr().err
