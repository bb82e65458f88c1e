"""The house for what comes next: a pruning method with rounds added from a test file alone, run
through prune_at_init and the CLI; the config schema and its run keys; the generated CLI; the
staged pipeline's training callbacks and statuses; dict batches end to end."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsetrain as st
from sparsetrain.cli.main import build_parser, main
from sparsetrain.config import PruneConfig, RunConfig, TrainConfig, schema
from sparsetrain.errors import SparsetrainError
from sparsetrain.experiments import structured_cost
from sparsetrain.pipeline import CHOICES
from sparsetrain.pruning import METHODS, register_method
from sparsetrain.recipes import load_recipe
from sparsetrain.store import RunStore
from sparsetrain.train.loop import Callback

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
TINY = ["--dataset", "synthetic", "--model", "mlp-tiny", "--no-progress"]


# --- a method with rounds, from this file alone -------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RowBonusOptions:
    bonus: float = 1.0


SEEN_MASKS: list[dict[str, torch.Tensor]] = []


def row_bonus_scores(ctx, options):
    """|w| * (1 + bonus * kept entries in the same row under the current mask): round k's scores
    depend on round k-1's mask."""
    SEEN_MASKS.append({n: m.clone() for n, m in ctx.mask.items()})
    out = {}
    for name, p in ctx.params.items():
        kept = ctx.mask[name].reshape(p.shape[0], -1).sum(1).float()  # (rows,)
        row_factor = (1 + options.bonus * kept).reshape(-1, *([1] * (p.dim() - 1)))
        out[name] = p.detach().abs() * row_factor
    return out


@pytest.fixture
def row_bonus():
    register_method("test-row-bonus", options=RowBonusOptions, data_free=True)(row_bonus_scores)
    SEEN_MASKS.clear()
    yield "test-row-bonus"
    METHODS.unregister("test-row-bonus")


def test_a_method_with_rounds_added_from_a_test_file(row_bonus):
    model = st.create_model("mlp-tiny")
    mask = st.prune_at_init(model, row_bonus, sparsity=0.9, rounds=3, options={"bonus": 0.5})
    assert len(SEEN_MASKS) == 3
    assert all(bool(m.all()) for m in SEEN_MASKS[0].values())  # round 0: nothing pruned yet
    for before, after in zip(SEEN_MASKS, SEEN_MASKS[1:]):
        assert any(not torch.equal(before[n], after[n]) for n in before)  # each round sees the last one's mask
        assert all(bool((after[n] <= before[n]).all()) for n in before)  # never revived
    # the final mask keeps exactly kappa, and only entries that survived every round
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.1)
    assert all(bool((mask[n] <= SEEN_MASKS[-1][n]).all()) for n in mask)
    # the round-(k-1) mask changes round k's scores: an independent oracle of the last round
    params = dict(model.named_parameters())
    oracle = row_bonus_scores(type("Ctx", (), {"params": {n: params[n] for n in mask}, "mask": SEEN_MASKS[-1]})(),
                              RowBonusOptions(0.5))
    SEEN_MASKS.pop()
    plain = {n: params[n].detach().abs() for n in mask}
    assert any(not torch.allclose(oracle[n], plain[n]) for n in mask)
    # deterministic
    again = st.prune_at_init(model, row_bonus, sparsity=0.9, rounds=3, options={"bonus": 0.5})
    assert all(torch.equal(again[n], mask[n]) for n in mask)


def test_the_method_runs_through_the_cli_with_its_options_and_rounds(row_bonus, capsys, tmp_path):
    out = tmp_path / "mask.safetensors"
    code = main(["prune", *TINY, "--method", row_bonus, "--sparsity", "0.8", "--prune-rounds", "2",
                 "--option", "bonus=2.0", "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    mask = st.load_mask(out)
    assert len(SEEN_MASKS) == 2
    total = sum(m.numel() for m in mask.values())
    assert sum(int(m.sum()) for m in mask.values()) == round(total * 0.2)
    # its name is in the generated help, since the choices come from the registry
    assert row_bonus in build_parser().format_help() or row_bonus in _subcommand_help("run")
    # a wrong option is a clear error, exit 2
    code = main(["prune", *TINY, "--method", row_bonus, "--option", "bonsu=1", "--out", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "bonsu" in err and "bonus" in err and "Traceback" not in err


def _subcommand_help(name: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices[name].format_help()


# --- the config schema and run keys ---------------------------------------------------------------

def _recorded_runs():
    """(how to rebuild the config, recorded key) for every run in docs/results/*.json."""
    table1 = json.loads((RESULTS / "snip_table1.json").read_text())
    for row, runs in table1.items():
        if row == "provenance":
            continue
        for r in runs:
            yield f"snip-table1/{row}/{r['seed']}", load_recipe(row).replace(seed=r["seed"], name=row), r["key"]
    cost = json.loads((RESULTS / "structured_cost.json").read_text())
    for row, summary in cost["rows"].items():
        for r in summary["runs"]:
            yield f"structured-cost/{row}/{r['seed']}", structured_cost.row_config(row, r["seed"]), r["key"]


RECORDED = list(_recorded_runs())


def test_every_recorded_result_is_pinned():
    assert len(RECORDED) >= 18 + 33


@pytest.mark.parametrize("config, key", [(c, k) for _, c, k in RECORDED], ids=[i for i, _, _ in RECORDED])
def test_the_run_keys_of_recorded_results_are_unchanged(config, key):
    assert config.key() == key


def test_later_fields_stay_out_of_the_key_at_their_default_only():
    base = RunConfig(model="mlp-tiny", dataset="synthetic")
    later = [(s, f) for s, f in schema() if f.metadata.get("later")]
    assert {f.name for _, f in later} >= {"structure", "execution", "model_args", "data_args", "options", "rounds"}
    identity = base.identity()
    for section, f in later:
        assert f.name not in (identity[section] if section else identity)
    changed = {
        base.replace(prune={"rounds": 3}).key(), base.replace(prune={"options": {"x": 1}}).key(),
        base.replace(model_args={"hidden": 8}).key(), base.replace(data_args={"view": "rows"}).key(),
        base.replace(train={"goal_error": 0.1}).key(), base.replace(prune={"exclude": ["pos*"]}).key(),
    }
    assert base.key() not in changed and len(changed) == 6


def test_every_setting_has_help_and_a_generated_flag():
    help_text = _subcommand_help("run")
    for section, f in schema():
        if f.name == "name":
            continue
        assert f.metadata.get("help"), (section, f.name)
        flag = "--" + (f.metadata.get("flag") or f.name.replace("_", "-"))
        assert flag in help_text, flag
        registry = f.metadata.get("registry")
        if registry:  # its choices come from the registry, not from a list kept by hand
            assert registry in CHOICES


def test_nested_tables_round_trip_through_toml():
    config = RunConfig(model="mlp-tiny", dataset="synthetic", model_args={"hidden": 8},
                       data_args={"n_train": 300}).replace(prune={"options": {"a": 1}, "exclude": ["x*"], "rounds": 2})
    import tomllib

    assert RunConfig.from_dict(tomllib.loads(config.to_toml())) == config
    assert config.prune.exclude == ("x*",)


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["--option", "nosuch=1"], ["takes no options", "nosuch"]),
        (["--model-arg", "depth=3"], ["'depth'", "hidden"]),
        (["--model-arg", "hidden=wide"], ["hidden", "int"]),
        (["--data-arg", "nosuch=1"], ["nosuch", "n_train"]),
        (["--data-arg", "flip=true"], ["flip"]),
        (["--data-arg", "view=columns"], ["view", "rows"]),
        (["--model-arg", "hidden"], ["KEY=VALUE"]),
        (["--goal-error", "1.5"], ["goal_error"]),
        (["--on-diverge", "ignore"], ["on_diverge", "infeasible"]),
        (["--prune-rounds", "0"], ["rounds"]),
    ],
)
def test_bad_input_on_the_new_surfaces_exits_2(capsys, tmp_path, argv, needles):
    store = tmp_path / "store"
    code = main(["run", *TINY, "--iterations", "5", *argv, "--store", str(store)])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert "Traceback" not in err and out == ""
    for needle in needles:
        assert needle in err, (needle, err)
    assert RunStore(store).list() == []


def test_a_sequence_model_on_images_says_to_use_the_rows_view(capsys, tmp_path):
    code = main(["run", "--dataset", "synthetic", "--model", "lstm-tiny", "--iterations", "5", "--no-progress",
                 "--store", str(tmp_path / "s")])
    assert code == 2 and "view = 'rows'" in capsys.readouterr().err
    code = main(["run", "--dataset", "synthetic", "--model", "lstm-tiny", "--data-arg", "view=rows",
                 "--iterations", "5", "--val-every", "5", "--no-progress", "--store", str(tmp_path / "s")])
    assert code == 0, capsys.readouterr().err


# --- the pipeline's callbacks and statuses ---------------------------------------------------------

def tiny(**train) -> RunConfig:
    return RunConfig(model="mlp-tiny", dataset="synthetic", name="tiny").replace(
        prune={"sparsity": 0.5}, train={"iterations": 100, "val_every": 10, "lr": 0.05, **train})


def test_a_goal_error_stops_the_run_at_the_first_check_that_reaches_it(tmp_path):
    store = RunStore(tmp_path / "store")
    full = st.run(tiny(), store=None, progress=False)
    goal = full.results["best_val_error"] + 1e-9
    outcome = st.run(tiny(goal_error=goal), store=store, progress=False)
    assert outcome.status == "stopped" and "goal" in outcome.results["stop_reason"]
    curve = store.metrics(outcome.key, "val_error")["val_error"]
    first = next(step for step, err in curve if err <= goal)
    assert outcome.results["steps"] == first == curve[-1][0]  # nothing trained past the goal
    assert store.get(outcome.key).status == "stopped"
    # a stopped run is a result: starting it again reuses it
    assert st.run(tiny(goal_error=goal), store=store, progress=False).reused


class CountingCallback(Callback):
    def __init__(self):
        self.steps, self.evals = [], []

    def on_step(self, step, loss):
        self.steps.append((step, float(loss)))

    def on_eval(self, step, metrics):
        self.evals.append((step, dict(metrics)))
        return "enough" if step >= 30 else None


def test_callbacks_see_every_step_and_evaluation_and_can_stop():
    cb = CountingCallback()
    outcome = st.run(tiny(), store=None, progress=False, callbacks=[cb])
    assert [s for s, _ in cb.steps] == list(range(1, 31))
    assert all(math.isfinite(loss) for _, loss in cb.steps)
    assert [s for s, _ in cb.evals] == [10, 20, 30] and "val_error" in cb.evals[0][1]
    assert outcome.status == "stopped" and outcome.results["stop_reason"] == "enough"


def test_a_diverged_run_is_recorded_as_infeasible_when_asked(tmp_path):
    store = RunStore(tmp_path / "store")
    blow_up = tiny(lr=1e6, momentum=0.0)
    with pytest.raises(SparsetrainError, match="diverged"):
        st.run(blow_up, store=None, progress=False)
    outcome = st.run(blow_up.replace(train={"on_diverge": "infeasible"}), store=store, progress=False)
    assert outcome.status == "infeasible" and outcome.results["test_error_final"] is None
    assert store.get(outcome.key).status == "infeasible"


# --- dict batches through pruning, training and evaluation --------------------------------------

class DictModel(nn.Module):
    """A Hugging Face-style classifier: model(**batch) -> an object with .loss and .logits."""

    def __init__(self, logits: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 10))
        self.logits = logits

    def forward(self, pixel_values, labels=None):
        out = self.net(pixel_values)
        loss = nn.functional.cross_entropy(out, labels) if labels is not None else None
        return {"loss": loss, "logits": out} if self.logits else {"loss": loss}


class DictLoaders:
    """loaders.train/val/test yielding dict batches, built from the synthetic data set."""

    def __init__(self):
        base = st.create_loaders("synthetic", batch_size=50)
        self.base = base
        self.train = _DictStream(base.train)
        self.val = [_as_dict(b) for b in base.val]
        self.test = [_as_dict(b) for b in base.test]


def _as_dict(batch):
    x, y = batch
    return {"pixel_values": x, "labels": y}


class _DictStream:
    def __init__(self, stream):
        self.stream, self.steps_per_epoch = stream, stream.steps_per_epoch

    def iter_from(self, step):
        return (_as_dict(b) for b in self.stream.iter_from(step))


@pytest.mark.parametrize("with_logits", [True, False])
def test_dict_batches_prune_train_and_evaluate(with_logits):
    torch.manual_seed(0)
    loaders = DictLoaders()
    model = DictModel(with_logits)
    mask = st.prune_at_init(model, "snip", sparsity=0.9, batches=loaders.train.iter_from(0).__next__())
    st.apply_mask_(model, mask)
    result = st.train(model, loaders, TrainConfig(iterations=40, val_every=20, lr=0.05),
                      hooks=[st.GradientMask(model, mask)], progress=False)
    assert all(bool((dict(model.named_parameters())[n][~m] == 0).all()) for n, m in mask.items())
    if with_logits:
        assert result.final_test_error is not None and result.final_test_error < 0.5
    else:  # judged by its loss alone
        assert result.final_test_error is None and "test_loss" in result.curves
        assert "val_loss" in result.curves and "val_error" not in result.curves


def test_report_only_rebuilds_the_committed_table1_rows_from_a_store(tmp_path, capsys):
    """The recorded Table 1 results, put back in a store under their keys, give the committed
    table's rows again through `reproduce snip-table1 --report-only` (the table is unchanged)."""
    recorded = json.loads((RESULTS / "snip_table1.json").read_text())
    store = RunStore(tmp_path / "store")
    for row, runs in recorded.items():
        if row == "provenance":
            continue
        for r in runs:
            config = load_recipe(row).replace(seed=r["seed"], name=row)
            assert config.key() == r["key"]
            store.begin(r["key"], config.to_dict(), r["seed"], name=row)
            results = {k: v for k, v in r.items() if k not in ("seed", "key", "train_seconds")}
            store.finish(r["key"], results, timings={"train_seconds": r["train_seconds"]})
    out = tmp_path / "t.md"
    assert main(["reproduce", "snip-table1", "--report-only", "--store", str(tmp_path / "store"),
                 "--out", str(out)]) == 0, capsys.readouterr().err
    rows = [line for line in out.read_text().splitlines() if line.startswith("| LeNet")]
    committed = [line for line in (RESULTS / "snip_table1.md").read_text().splitlines() if line.startswith("| LeNet")]
    assert rows == committed and len(rows) == 6
