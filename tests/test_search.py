"""Mixed-precision search (`qspeech search`): the exact allocation against brute force, budgets respected to the
bit by the project's own accounting, the sensitivity cache, and the written plan run by `qspeech run`."""

import itertools
import json
import random
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from conftest import random_upstream, run_cli
from qspeech.config import CONF_DIR, RunConfig, to_typed
from qspeech.cost import account_quantized
from qspeech.quant import quant_config
from qspeech.quant.targets import select_targets
from qspeech.search import Infeasible, solve
from qspeech.search.config import SearchRunConfig
from qspeech.search.plan import capacity, price, searched_modules
from qspeech.search.sensitivity import cached_sensitivity
from qspeech.upstream import fingerprint

# The smoke corpus (conf/experiment/smoke.yaml's), so that search and run share its cache and random upstream.
SMOKE_DATA = ["data.mini.n_train=24", "data.mini.n_dev=8", "data.mini.n_test=8", "data.mini.n_unlabeled=24",
              "data.mini.train_speakers=4", "data.mini.dev_speakers=2", "data.mini.test_speakers=2",
              "data.mini.unlabeled_speakers=2"]
# Layer 0's six linears only: a sensitivity pass of seconds.
SMALL = ["model.init=random", *SMOKE_DATA, "quant.exclude=['encoder.layers.[1-5].*']", "search.utterances=2",
         "search.max_seconds=0.5"]


def brute_force(costs, damages, cap):
    best = None
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(c[j] for c, j in zip(costs, pick))
        dmg = sum(d[j] for d, j in zip(damages, pick))
        if cost <= cap and (best is None or dmg < best[1]):
            best = (pick, dmg, cost)
    return best


# ------------------------------------------------------------------------------------------------ the solver
def test_hand_checked_instance():
    # Two modules at 1/2/4 bits (costs 1, 2, 4 units, damage falling with bits). Capacity 6: (4, 2) costs 6
    # with damage 0.1 + 0.3 = 0.4; (2, 4) costs 6 with 0.5 + 0.05 = 0.55; (4, 1) costs 5 with 0.1 + 0.9 = 1.0.
    costs = [[1, 2, 4], [1, 2, 4]]
    damages = [[2.0, 0.5, 0.1], [0.9, 0.3, 0.05]]
    sol = solve(costs, damages, 6)
    assert sol.choices == [2, 1] and sol.cost == 6 and sol.damage == pytest.approx(0.4) and sol.exact
    assert solve(costs, damages, 8).choices == [2, 2]  # everything fits
    assert solve(costs, damages, 2).choices == [0, 0]  # only the cheapest fits
    with pytest.raises(Infeasible) as e:
        solve(costs, damages, 1)
    assert e.value.minimum == 2


@pytest.mark.parametrize("seed", range(40))
def test_dp_equals_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 4)
    unit = rng.choice([1, 3, 256])  # a common divisor, as real storage costs have
    costs = [sorted(unit * rng.randint(0, 40) for _ in range(k)) for _ in range(n)]
    damages = [[rng.choice([0.0, rng.random(), 0.5]) for _ in range(k)] for _ in range(n)]
    lo, hi = sum(min(c) for c in costs), sum(max(c) for c in costs)
    cap = rng.randint(max(0, lo - unit), hi + unit)
    expected = brute_force(costs, damages, cap)
    if expected is None:
        with pytest.raises(Infeasible):
            solve(costs, damages, cap)
        return
    sol = solve(costs, damages, cap)
    assert sol.exact and sol.cost <= cap
    assert sol.cost == sum(c[j] for c, j in zip(costs, sol.choices))
    assert sol.damage == pytest.approx(expected[1], abs=1e-12)


def test_coarse_dp_stays_within_budget():
    rng = random.Random(0)
    costs = [[rng.randint(0, 10_000) for _ in range(3)] for _ in range(5)]
    damages = [[rng.random() for _ in range(3)] for _ in range(5)]
    cap = sum(sorted(c)[1] for c in costs) + 7
    exact = solve(costs, damages, cap)
    coarse = solve(costs, damages, cap, max_units=50)
    assert exact.exact and not coarse.exact and coarse.unit > 1
    assert coarse.cost <= cap and coarse.damage >= exact.damage - 1e-12
    assert exact.damage == pytest.approx(brute_force(costs, damages, cap)[1], abs=1e-12)


# ------------------------------------------------------------------------------------------------ costs, budgets
def _search_cfg(overrides) -> SearchRunConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose("search", overrides=overrides))


def test_search_config_composes_and_refuses_bad_budgets():
    cfg = _search_cfg(["budget_bits=2"])
    assert isinstance(cfg, SearchRunConfig) and cfg.search.bits == [1, 2, 4, 8] and cfg.model.name == "tiny_hubert"
    from qspeech.errors import ConfigError

    for bad, needle in ((["budget_bits=2", "budget_mb=1.0"], "exactly one budget"), ([], "exactly one budget"),
                        (["budget_mb=-1"], "budget_mb=-1"), (["budget_bits=2", "search.bits=[1,5]"], "search.bits=5"),
                        (["budget_bits=2", "quant=bit", "search.bits=[1,4]"], "search.bits=4"),
                        (["budget_bits=2", "model=fbank"], "no weights")):
        with pytest.raises(ConfigError, match=needle):
            _search_cfg(bad)


def test_search_folder_is_named_by_the_run_identity():
    """The folder's hash is qspeech.identity's: runtime and outside settings (data.mini.workers, cache_dir,
    model.trust_checkpoint) land in the same folder, a result setting in another."""
    def folder(overrides):
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="qspeech"):
            return compose(config_name="search", overrides=overrides, return_hydra_config=True).hydra.run.dir

    base = folder(["budget_bits=2"])
    assert base.startswith("outputs/search/tiny_hubert_rtn_b2_")
    assert folder(["budget_bits=2", "data.mini.workers=1", "cache_dir=/elsewhere", "model.trust_checkpoint=true"]) == base
    assert folder(["budget_bits=2", "search.utterances=4"]) != base
    assert folder(["budget_bits=2", "search.name=mine"]) == "outputs/search/mine"


@pytest.fixture(scope="module")
def upstream():
    return random_upstream("tiny_hubert")


@pytest.mark.parametrize("targets", [["linear"], ["linear", "cnn"]])
def test_every_choice_costs_what_the_accounting_says(upstream, targets):
    # A random allocation, priced by the search's table, equals the accounting of the same quant config.
    quant = quant_config("rtn", targets=targets, symmetric=False)
    names, pinned = searched_modules(upstream.model, quant)
    assert pinned == {} and len(names) == 36 + (7 if "cnn" in targets else 0)
    costs = price(upstream, quant, names, pinned, [1, 2, 4, 8, 32], 1.0)
    rng = random.Random(1)
    pick = [rng.randrange(5) for _ in names]
    alloc = {n: costs.bits[j] for n, j in zip(names, pick)}
    q = quant_config("rtn", targets=targets, symmetric=False, overrides=alloc)
    report = account_quantized(upstream, q, 2, 1.0)
    assert sum(r.storage_bits for r in report.rows) == costs.fixed_storage + sum(
        costs.storage[i][j] for i, j in enumerate(pick))
    runtime = costs.runtime_of(costs.fixed_runtime + sum(costs.runtime[i][j] for i, j in enumerate(pick)))
    assert runtime == pytest.approx(report.est_runtime, rel=1e-12)


def test_pinned_modules_keep_their_bits(upstream):
    quant = quant_config("rtn", targets=["linear"], overrides={"encoder.layers.0.*": 8, "encoder.layers.1.fc1": 32},
                        exclude=["encoder.layers.5.*"])
    names, pinned = searched_modules(upstream.model, quant)
    assert len(names) == 36 - 6 - 1 - 6 and pinned["encoder.layers.1.fc1"] == 32
    assert all(pinned[f"encoder.layers.0.{m}"] == 8 for m in ("fc1", "fc2", "self_attn.k_proj"))
    assert not any(n.startswith(("encoder.layers.0.", "encoder.layers.5.")) or n == "encoder.layers.1.fc1" for n in names)


def test_storage_budget_is_respected_to_the_bit(upstream):
    quant = quant_config("rtn", targets=["linear"], symmetric=False)
    names, pinned = searched_modules(upstream.model, quant)
    costs = price(upstream, quant, names, pinned, [1, 2, 4, 8], 1.0, (2,))
    u2 = costs.uniform_storage[2]
    # budget_bits=2: exactly the uniform 2-bit storage; budget_mb at that number: the same capacity.
    cfg = _search_cfg(["budget_bits=2"])
    assert capacity(cfg, costs) == ("storage", u2 - costs.fixed_storage, u2 / 8e6)
    cfg_mb = _search_cfg([f"budget_mb={u2 / 8e6!r}"])
    assert capacity(cfg_mb, costs)[1] == u2 - costs.fixed_storage
    rng = random.Random(0)
    damages = [[rng.random() * 2 ** -b for b in costs.bits] for _ in names]
    sol = solve(costs.storage, damages, u2 - costs.fixed_storage)
    total = costs.fixed_storage + sol.cost
    assert total <= u2 and costs.storage_mb(total) <= cfg_mb.budget_mb
    # one bit below the all-1-bit minimum is infeasible, the minimum itself is not
    least = costs.uniform_storage.get(1) or costs.fixed_storage + sum(c[0] for c in costs.storage)
    with pytest.raises(Infeasible):
        solve(costs.storage, damages, least - costs.fixed_storage - 1)
    assert solve(costs.storage, damages, least - costs.fixed_storage).choices == [0] * len(names)


# ------------------------------------------------------------------------------------------------ sensitivity
def test_sensitivity_is_measured_once_and_cached(upstream, tmp_path):
    from qspeech.data import Utterance

    import numpy as np
    import soundfile as sf

    rng = np.random.default_rng(0)
    utts = []
    for i in range(2):
        p = tmp_path / f"u{i}.wav"
        sf.write(p, (0.1 * rng.standard_normal(8000)).astype(np.float32), 16000)
        utts.append(Utterance(f"u{i}", str(p), "", "s", 0.5))
    quant = quant_config("rtn", targets=["linear"], symmetric=False)
    names = [f"encoder.layers.0.{m}" for m in ("fc1", "self_attn.k_proj")]
    before = fingerprint(upstream)
    d1, info1 = cached_sensitivity(upstream, quant, names, [1, 8, 32], utts, 2, 0.5, "all", tmp_path / "c", False)
    assert info1["status"] == "miss" and info1["measured"] == 4
    assert fingerprint(upstream) == before  # a copy is quantized, never the upstream
    for n in names:
        assert d1[n][32] == 0.0 and d1[n][1] > d1[n][8] > 0
    d2, info2 = cached_sensitivity(upstream, quant, names, [1, 8, 32], utts, 2, 0.5, "all", tmp_path / "c", False)
    assert info2["status"] == "hit" and info2["measured"] == 0 and d2 == d1
    d3, info3 = cached_sensitivity(upstream, quant, names, [1, 2, 8], utts, 2, 0.5, "all", tmp_path / "c", False)
    assert info3["status"] == "partial" and info3["measured"] == 2 and d3[names[0]][1] == d1[names[0]][1]
    # another quantizer setting is another key
    other = quant_config("rtn", targets=["linear"], symmetric=True)
    _, info4 = cached_sensitivity(upstream, other, names, [8], utts, 2, 0.5, "all", tmp_path / "c", False)
    assert info4["status"] == "miss" and info4["key"] != info1["key"]


# ------------------------------------------------------------------------------------------------ the command
def _plan_run_config(plan: dict, extra=()) -> RunConfig:
    root = Path(plan["plan_file"]).parent.parent
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_typed(compose("config", overrides=[f"hydra.searchpath=[file://{root}]",
                                                     f"+quant_plan={plan['name']}", *extra]))


def test_search_writes_a_plan_that_run_accepts(tmp_path):
    env = {"QSPEECH_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "out"
    args = ["search", "budget_bits=2", *SMALL, f"hydra.run.dir={out}/search/small"]
    proc = run_cli(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((out / "search" / "small" / "plan.json").read_text())
    assert plan["sensitivity"]["status"] == "miss" and plan["exact"]
    assert plan["budget"] == {"on": "storage", "value": plan["budget"]["value"], "given": "b2"}
    assert plan["storage_mb"] <= plan["budget"]["value"]
    assert {m["name"] for m in plan["modules"]} == {f"encoder.layers.0.{m}" for m in
                                                    ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj",
                                                     "self_attn.out_proj", "fc1", "fc2")}
    assert {g["group"] for g in plan["groups"]} == {"attention linears", "FFN"}
    assert plan["predicted_damage"] <= next(u["damage"] for u in plan["uniform"] if u["bits"] == 2) + 1e-12
    assert f"+quant_plan={plan['name']}" in proc.stdout and Path(plan["plan_file"]).is_file()

    # The plan file composes into the run's config with the planned bits, so does the self-contained command.
    cfg = _plan_run_config(plan, ["experiment=smoke"])
    alloc = {m["name"]: m["bits"] for m in plan["modules"]}
    assert cfg.quant.exclude == ["encoder.layers.[1-5].*"] and cfg.bits == plan["bits"]
    upstream = random_upstream("tiny_hubert")
    assert select_targets(upstream.model, cfg.bits, cfg.quant.targets, cfg.quant.exclude, cfg.quant.overrides) == {
        n: b for n, b in alloc.items() if b < 32}
    import shlex

    inline = shlex.split(plan["command_inline"])[2:]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg2 = to_typed(compose("config", overrides=inline))
    assert (cfg2.quant, cfg2.bits) == (cfg.quant, cfg.bits)

    # qspeech run takes it, and its result.json has the planned storage
    run_dir = out / "run"
    proc = run_cli("run", "experiment=smoke", f"hydra.searchpath=[file://{out / 'search'}]",
                   f"+quant_plan={plan['name']}", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["storage_mb"] == round(plan["storage_mb"], 4)  # result.json rounds
    cost = json.loads((run_dir / "cost.json").read_text())  # the run's accounting, unrounded
    assert cost["storage_mb"] == plan["storage_mb"] and cost["est_runtime"] == pytest.approx(plan["est_runtime"])
    assert {m["name"]: m["bits"] for m in cost["modules"] if m["quantized"]} == {
        n: b for n, b in alloc.items() if b < 32}

    # The second search measures nothing and plans the same.
    proc = run_cli(*args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads((out / "search" / "small" / "plan.json").read_text())
    assert again["sensitivity"]["status"] == "hit" and again["overrides"] == plan["overrides"]


def test_runtime_budget(tmp_path):
    env = {"QSPEECH_CACHE": str(tmp_path / "cache")}
    proc = run_cli("search", "budget_runtime=0.93", *SMALL, "search.bits=[1,8]",
                   f"hydra.run.dir={tmp_path}/s", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    assert plan["budget"]["on"] == "runtime" and plan["est_runtime"] <= 0.93 + 1e-12
    # between uniform 1-bit (0.921) and 8-bit (0.939) of layer 0: a mix of both
    assert sorted({m["bits"] for m in plan["modules"]}) == [1, 8]


def _one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("qspeech: error:") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


@pytest.mark.parametrize("args,needle", [
    (["budget_mb=0.1"], "budget_mb=0.1 is below the smallest storage of this search"),
    (["budget_runtime=0.01"], "budget_runtime=0.01 is below the least estimated runtime"),
    (["budget_bits=2", "model=nope"], "model=nope: no such option"),
    ([], "set exactly one budget"),
    (["budget_mb=2", "budget_bits=2"], "set exactly one budget"),
    (["budget_bits=2", "quant.targets=[linear]", "quant.exclude=[encoder.*]"], "leaves no module"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    proc = run_cli("search", *args, "model.init=random", f"hydra.run.dir={tmp_path}/s", cwd=tmp_path,
                   env={"QSPEECH_CACHE": str(tmp_path / "cache")})
    assert needle in _one_error_line(proc)
    assert not (tmp_path / "s" / "plan.json").exists()
