"""The plug-in registry: options declared in the plug-ins' own modules become checked settings,
flags and run-config keys; the files generated from the registries are up to date."""

import subprocess
import sys

import pytest

from fedtune.config import Settings
from fedtune.generate import main
from fedtune.plugins import Option, declared_options, in_interval


def test_generated_files_are_up_to_date(capsys):
    """plugins.json, pyproject's [tool.flwr.app.config] and the README's algorithm table."""
    code = main(["--check"])
    assert code == 0, capsys.readouterr().out


@pytest.mark.parametrize("value, interval, inside", [
    (0.0, "[0, 1)", True), (1.0, "[0, 1)", False), (1.0, "(0, 1]", True), (0.0, "(0, 1]", False),
    (5.0, "(0, inf)", True), (-5.0, "(-inf, 0]", True), (float("nan"), "(-inf, inf)", False),
])
def test_intervals(value, interval, inside):
    assert in_interval(value, interval) is inside


def test_an_option_refuses_a_bad_declaration():
    with pytest.raises(ValueError, match="interval '0..1' is not of the form"):
        Option(0.5, "x", interval="0..1")
    with pytest.raises(ValueError, match=r"the default is not allowed: default=2.0 \(must be in \[0, 1\)\)"):
        Option(2.0, "x", interval="[0, 1)")
    with pytest.raises(TypeError):
        Option(True, "booleans are ints in Python: say 0 or 1")


def test_every_declared_option_is_a_setting_a_flag_and_checked():
    from fedtune.algorithms import registered
    from fedtune.cli import build_parser

    options = declared_options()
    assert options["prox_mu"][0] == ["fedprox"] and options["client_ranks"][0] == ["flexlora", "hetlora", "flora"]
    live = {name for cls in registered().values() for name in cls.declared_options()}
    assert live <= set(options)
    defaults = Settings()
    for name, (_, option) in options.items():
        assert getattr(defaults, name) == option.default
    args = build_parser().parse_args(["run", "--prox-mu", "0.5", "--hetlora-prune", "0.9"])
    assert (args.prox_mu, args.hetlora_prune) == ("0.5", "0.9")
    with pytest.raises(ValueError, match=r"prox-mu=-1.0 \(must be in \[0, inf\)\)"):
        Settings.from_dict({"prox-mu": -1})
    with pytest.raises(ValueError, match=r"hetlora-weighting='norm' \(choose from: sparsity, examples\)"):
        Settings.from_dict({"hetlora-weighting": "norm"})


def test_settings_survive_pickling_as_ray_sends_them():
    import pickle

    settings = Settings(algorithm="fedprox", prox_mu=0.1)
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_the_cli_reads_no_plug_in_module_to_parse_flags():
    """--help and settings come from plugins.json: torch is not imported to parse them."""
    code = ("import sys; from fedtune.cli import build_parser, settings_from_args; "
            "settings_from_args(build_parser().parse_args(['run', '--prox-mu', '0.2'])); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_grid_rows_come_from_the_registry_and_remedies_add_rows(glue_dir):
    from fedtune.grid import grid_rows, make_grid

    labels = [label for label, _ in grid_rows()]
    assert labels[:5] == ["Finetune", "KD", "LoRA", "Fed-finetune (FedAvg)", "Fed-LoRA"]
    assert labels[-4:] == ["FedProx", "FedAdam", "Fed-finetune (FedAdam)", "FedDyn"] and len(labels) == 16
    base = Settings(task="sst2", glue_dir=str(glue_dir), clients=4, local_epochs=0.06)
    cells = make_grid(base, seeds=1, methods=["LoRA", "Fed-LoRA"], remedy_names=["fedlc", "equal-steps"])
    assert [c.label for c in cells] == ["LoRA", "Fed-LoRA", "Fed-LoRA + fedlc", "Fed-LoRA + equal-steps"]
    equal = cells[-1].settings
    # 53,879 private SST-2 rows (67,349 less the 13,470 of the public slice) / 4 clients = 13,470
    # rows: 421 batches of 32, and 6% of them rounds up to 26 steps
    assert equal.client_weighting == "uniform" and equal.local_steps == 26
    assert len({c.key for c in cells}) == 4
    # A remedied row can be named on its own (to assemble a table of the finished rows)
    picked = make_grid(base, seeds=1, methods=["Fed-LoRA", "Fed-LoRA + equal-steps", "FedProx + fedlc"],
                       remedy_names=["fedlc", "equal-steps"])
    assert [c.label for c in picked] == ["Fed-LoRA", "Fed-LoRA + equal-steps", "FedProx + fedlc"]


def test_two_remedies_joined_by_a_plus_change_both_settings_and_a_clash_is_refused():
    from fedtune.grid import remedy_settings

    assert remedy_settings("feddecorr+ccvr-lda") == {"client_loss": "feddecorr", "classifier_calibration": "ccvr-lda"}
    with pytest.raises(ValueError, match="'logit-adjust' sets client_loss again"):
        remedy_settings("fedlc+logit-adjust")
    with pytest.raises(ValueError, match="unknown remedy 'nope'"):
        remedy_settings("fedlc+nope")
