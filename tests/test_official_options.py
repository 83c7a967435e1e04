"""Official option files: read as the official code reads them, merged with what the weights say.

Each family has a small option file in ``tests/fixtures/official/`` laid out like the released one and sized
like its checkpoint fixture. A matching file settles what the weights cannot (the stacked blocks, NCSR's S,
FS-NCSR's ``divide_freq``), and the adapter built from it reproduces the official code's encode; a file that
leaves such a key out, or contradicts the weights, is refused with the key named.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flowaudit.adapters import ModelError
from flowaudit.adapters import official as off
from flowaudit.adapters import official_options as oo

FIXTURES = Path(__file__).parent / "fixtures" / "official"
NAMES = ("srflow-x4", "srflow-x8", "ncsr-x4", "fs-ncsr-x4", "spline-x4", "llflow")
FAMILY = {
    "srflow-x4": "srflow",
    "srflow-x8": "srflow",
    "ncsr-x4": "ncsr",
    "fs-ncsr-x4": "fs-ncsr",
    "spline-x4": "spline",
    "llflow": "llflow",
}


def fixture(name: str) -> dict:
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    if "state_dict" not in fx:  # FS-NCSR shares NCSR's weights
        fx["state_dict"] = torch.load(FIXTURES / fx["weights_from"], weights_only=True)["state_dict"]
    return fx


def from_weights(state: dict) -> tuple[str, dict]:
    """The layout and the values :func:`off.infer` reads off the weights themselves."""
    layout, _, inferred = off.infer(state)
    return layout, {k: v for k, v in inferred.items() if inferred["source"].get(k) == "weights"}


def options(text: str, tmp_path: Path) -> dict:
    path = tmp_path / "options.yml"
    path.write_text(text)
    return oo.option_values(oo.read_option_file(path))


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("name", NAMES)
def test_a_matching_file_settles_what_the_weights_cannot_and_matches_the_official_encode(name):
    fx = fixture(name)
    layout, weights = from_weights(fx["state_dict"])
    said = oo.option_values(oo.read_option_file(FIXTURES / f"{name}.yml"))
    resolved, warnings = oo.resolve(layout, weights, options=said)
    assert warnings == [] and oo.warning_line(warnings) is None
    assert resolved["family"].value == FAMILY[name] and resolved["family"].source == "option file"
    blocks = resolved["stack_blocks"]
    assert (blocks.value, blocks.source, blocks.key) == (
        fx["config"]["blocks"],
        "option file",
        "network_G.flow.stackRRDB.blocks",
    )
    assert resolved["K"].source == "weights" and resolved["K"].value == fx["config"]["K"]
    if layout in ("ncsr", "spline"):
        assert resolved["std_steps"].value == fx["config"]["S"] and resolved["std_steps"].key == "network_G.flow.S"
        assert resolved["fs_ncsr"].value == name.startswith("fs-") and resolved["fs_ncsr"].key == "divide_freq"
    else:
        assert "std_steps" not in resolved and "fs_ncsr" not in resolved
    # what the file settled builds the network the official code ran: its encode, to 1e-5
    adapter = off.build(fx["state_dict"], name, **oo.infer_options(resolved))
    with torch.no_grad():
        latents, _ = adapter.forward(fx["gt"], fx["lr"])
        official = adapter.to_official_latents(fx["lr"], latents)
    assert all(rel(g, w) <= 1e-5 for g, w in zip(official, fx["encode_z"], strict=True)), name


# per family, the key whose absence leaves a value that changes the outputs unsettled
MISSING = {
    "srflow-x4": ("      blocks: [ 0, 1 ]\n", "network_G.flow.stackRRDB.blocks"),
    "srflow-x8": ("      blocks: [ 0, 1 ]\n", "network_G.flow.stackRRDB.blocks"),
    "ncsr-x4": ("    S: [ 0, 1, 1 ]\n", "network_G.flow.S"),
    "fs-ncsr-x4": ("    S: [ 0, 1, 1 ]\n", "network_G.flow.S"),
    "spline-x4": ("    S: [ 0, 1, 1 ]\n", "network_G.flow.S"),
    "llflow": ("      blocks: [ 0, 1 ]\n", "network_G.flow.stackRRDB.blocks"),
}


@pytest.mark.parametrize("name", NAMES)
def test_a_file_missing_a_key_that_changes_outputs_is_refused_naming_it(name, tmp_path):
    text = (FIXTURES / f"{name}.yml").read_text()
    line, key = MISSING[name]
    assert line in text
    layout, weights = from_weights(fixture(name)["state_dict"])
    said = options(text.replace(line, ""), tmp_path)
    with pytest.raises(ModelError, match=key.replace(".", r"\.")):
        oo.resolve(layout, weights, options=said)


@pytest.mark.parametrize("name", NAMES)
def test_a_file_contradicting_the_weights_is_refused_naming_the_key(name, tmp_path):
    text = (FIXTURES / f"{name}.yml").read_text()
    assert "    K: 1\n" in text
    layout, weights = from_weights(fixture(name)["state_dict"])
    said = options(text.replace("    K: 1\n", "    K: 8\n"), tmp_path)
    with pytest.raises(ModelError, match=r"option file: network_G\.flow\.K is 8, but the weights have K = 1"):
        oo.resolve(layout, weights, options=said)


def test_released_sizes_resolve_and_a_wrong_k_names_the_key():
    """SRFlow DF2K ×4 as released (K 16, L 3, nf 64, nb 23, four stacked blocks): file K = 8 is refused."""
    weights = dict(
        L=3,
        K=16,
        nf=64,
        nb=23,
        gc=32,
        hidden_channels=64,
        n_transition=2,
        conditioning_channels=320,
        stacked_blocks=4,
        fixed_invconv=False,
        split_after_levels=[1],
        correct_splits=False,
        scale=4,
    )
    opt = {
        "scale": 4,
        "network_G": {
            "which_model_G": "SRFlowNet",
            "in_nc": 3,
            "out_nc": 3,
            "nf": 64,
            "nb": 23,
            "upscale": 4,
            "flow": {
                "K": 16,
                "L": 3,
                "coupling": "CondAffineSeparatedAndCond",
                "additionalFlowNoAffine": 2,
                "split": {"enable": True},
                "stackRRDB": {"blocks": [1, 8, 15, 22], "concat": True},
            },
        },
    }
    resolved, _ = oo.resolve("srflow", weights, options=oo.option_values(opt))
    assert resolved["stack_blocks"].value == [1, 8, 15, 22] and resolved["hidden_channels"].value == 64
    opt["network_G"]["flow"]["K"] = 8
    with pytest.raises(ModelError, match=r"network_G\.flow\.K is 8, but the weights have K = 16"):
        oo.resolve("srflow", weights, options=oo.option_values(opt))
    opt["network_G"]["flow"]["K"] = 16
    opt["network_G"]["flow"]["stackRRDB"]["blocks"] = [1, 8, 15]
    with pytest.raises(ModelError, match=r"stackRRDB\.blocks is \[1, 8, 15\], but the weights have 4 stacked"):
        oo.resolve("srflow", weights, options=oo.option_values(opt))


def test_without_a_file_flags_settle_it_and_nothing_refuses_naming_flag_and_key():
    layout, weights = from_weights(fixture("ncsr-x4")["state_dict"])
    with pytest.raises(ModelError, match=r"--stack-blocks or network_G\.flow\.stackRRDB\.blocks"):
        oo.resolve(layout, weights)
    with pytest.raises(ModelError, match=r"std_steps.*--std-steps or network_G\.flow\.S"):
        oo.resolve(layout, weights, flags={"stack_blocks": [0, 1]})
    with pytest.raises(ModelError, match=r"fs_ncsr.*--fs-ncsr or divide_freq"):
        oo.resolve(layout, weights, flags={"stack_blocks": [0, 1], "std_steps": [0, 1, 1]})
    resolved, warnings = oo.resolve(
        layout, weights, flags={"stack_blocks": (0, 1), "std_steps": [0, 1, 1], "fs_ncsr": True}
    )
    assert resolved["stack_blocks"].as_dict() == {"value": [0, 1], "source": "flag", "key": "--stack-blocks"}
    assert resolved["family"].value == "fs-ncsr"
    # harmless values take the official default, all in one warning line
    assert {resolved[n].source for n in ("scale", "affine_eps")} == {"default"}
    line = oo.warning_line(warnings)
    assert "\n" not in line and "scale=4 (--scale / scale)" in line and "affine_eps=0.0001" in line
    # every value says where it came from, the weights' ones which keys; all of it goes into JSON as is
    assert resolved["nf"].as_dict() == {"value": 4, "source": "weights", "key": "RRDB.conv_first.weight"}
    assert json.loads(json.dumps({k: p.as_dict() for k, p in resolved.items()}))["std_steps"]["source"] == "flag"
    # defaults stay infer's own (the official ones): only what a flag or file gave is passed on
    assert oo.infer_options(resolved) == {"stack_blocks": [0, 1], "std_steps": [0, 1, 1], "fs_ncsr": True}
    # a flag that the weights contradict
    with pytest.raises(ModelError, match=r"--std-steps \[0, 1\], but the weights have L = 3 levels"):
        oo.resolve(layout, weights, flags={"stack_blocks": [0, 1], "std_steps": [0, 1], "fs_ncsr": False})


def test_a_flag_and_the_file_must_agree(tmp_path):
    layout, weights = from_weights(fixture("ncsr-x4")["state_dict"])
    said = oo.option_values(oo.read_option_file(FIXTURES / "ncsr-x4.yml"))
    with pytest.raises(ModelError, match=r"--fs-ncsr True contradicts the option file's divide_freq = False \(absent"):
        oo.resolve(layout, weights, options=said, flags={"fs_ncsr": True})
    resolved, _ = oo.resolve(layout, weights, options=said, flags={"std_steps": [0, 1, 1]})
    assert resolved["std_steps"].source == "flag"


def test_spline_weights_with_robustnf_unmodified_conf_name_the_coupling(tmp_path):
    """robustNF's confs/4X.yml says CondAffineSeparatedAndCond; its runs override the coupling."""
    text = (
        (FIXTURES / "spline-x4.yml").read_text().replace("CondRQsplineSeparatedAndCond", "CondAffineSeparatedAndCond")
    )
    layout, weights = from_weights(fixture("spline-x4")["state_dict"])
    with pytest.raises(
        ModelError,
        match=r"network_G\.flow\.coupling is 'CondAffineSeparatedAndCond', but the weights have the spl.*config\.yml",
    ):
        oo.resolve(layout, weights, options=options(text, tmp_path))
    # a file without permutation_train: false describes trained 1×1s, the weights have fixed ones
    text = (FIXTURES / "spline-x4.yml").read_text().replace("    permutation_train: false\n", "")
    with pytest.raises(ModelError, match=r"permutation_train is absent .*fixed_invconv = True"):
        oo.resolve(layout, weights, options=options(text, tmp_path))


def test_llflow_values_flowaudit_does_not_model_are_refused_naming_the_key(tmp_path):
    text = (FIXTURES / "llflow.yml").read_text()
    with pytest.raises(ModelError, match=r"to_yuv is True; flowaudit reproduces LLFlow with to_yuv: false"):
        options(text.replace("to_yuv: false", "to_yuv: true"), tmp_path)
    with pytest.raises(ModelError, match=r"concat_histeq is False \(absent\)"):
        options(text.replace("concat_histeq: true\n", ""), tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "no such file"),
        ("# padding\n" * 200_000, "bytes; an option file is at most 1,048,576"),
        ("network_G: [1, 2\n", "not valid YAML at line"),
        ("- 1\n- 2\n", "holds a list, not a mapping"),
        ("scale: 4\n", "no network_G.flow section"),
        ("network_G: {which_model_G: Glow, flow: {coupling: CondAffineSeparatedAndCond}}\n", "which_model_G is 'Glow'"),
    ],
)
def test_unreadable_option_files_give_one_line(text, message, tmp_path):
    path = tmp_path / "bad.yml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ModelError, match=message.replace(".", r"\.").replace("(", r"\(").replace("[", r"\[")) as err:
        oo.option_values(oo.read_option_file(path))
    assert "\n" not in str(err.value)


def test_families_follow_the_model_coupling_and_divide_freq():
    def opt(model, coupling="CondAffineSeparatedAndCond", **top):
        return {"network_G": {"which_model_G": model, "flow": {"coupling": coupling}}, **top}

    # an NCSR file for SRFlow weights names the model key
    layout, weights = from_weights(fixture("srflow-x4")["state_dict"])
    said = oo.option_values(oo.read_option_file(FIXTURES / "ncsr-x4.yml"))
    with pytest.raises(ModelError, match=r"network_G\.which_model_G is 'NCSRNet', but the weights have the srflow"):
        oo.resolve(layout, weights, options=said)
    assert oo.family(opt("SRFlowNet")) == "srflow" and oo.family(opt("LLFlow")) == "llflow"
    assert oo.family(opt("NCSRNet")) == "ncsr" and oo.family(opt("NCSRNet", divide_freq=True)) == "fs-ncsr"
    assert oo.family(opt("NCSRNet", "CondRQsplineSeparatedAndCond", divide_freq=True)) == "spline"
    with pytest.raises(ModelError, match="goes with NCSRNet"):
        oo.family(opt("SRFlowNet", "CondRQsplineSeparatedAndCond"))
    with pytest.raises(ValueError, match="source 'guess'"):
        oo.Provenance(1, "guess", "K")


@pytest.mark.parametrize("value", [["SRFlowNet"], {"name": "SRFlowNet"}, 3, None])
@pytest.mark.parametrize("key", ["which_model_G", "coupling"])
def test_a_family_key_that_is_not_a_name_is_one_line_naming_the_key(key, value):
    """A list or mapping (unhashable) or a number where a name belongs: a ModelError naming the key, no TypeError."""
    net = {"which_model_G": "NCSRNet", "flow": {"coupling": "CondAffineSeparatedAndCond"}}
    if key == "which_model_G":
        net["which_model_G"] = value
    else:
        net["flow"]["coupling"] = value
    with pytest.raises(ModelError) as err:
        oo.family({"network_G": net})
    full = "network_G.which_model_G" if key == "which_model_G" else "network_G.flow.coupling"
    assert str(err.value).startswith(f"option file: {full} is {value!r}; expected one of ")
    assert "\n" not in str(err.value)


# -- wired in: load_model(path, official_config=FILE), --official-config, inspect ---------------------------------


def saved(name: str, tmp_path: Path) -> Path:
    path = tmp_path / f"{name}.pth"
    torch.save(fixture(name)["state_dict"], path)  # as the official save_network writes it
    return path


@pytest.mark.parametrize("name", NAMES)
def test_load_model_with_the_option_file_equals_the_flags(name, tmp_path):
    from flowaudit.adapters import load_model

    path, cfg = saved(name, tmp_path), fixture(name)["config"]
    flags = {"stack_blocks": cfg["blocks"]}
    if "S" in cfg:
        flags.update(std_steps=cfg["S"], fs_ncsr=name.startswith("fs-"))
    by_file = load_model(str(path), official_config=FIXTURES / f"{name}.yml")
    by_flags = load_model(str(path), official=flags)
    assert by_file.fingerprint() == by_flags.fingerprint()
    assert by_file.model.config == by_flags.model.config  # the same network, built from either source
    conf = by_file.describe()["configuration"]
    assert conf["stack_blocks"] == {
        "value": cfg["blocks"],
        "source": "option file",
        "key": "network_G.flow.stackRRDB.blocks",
    }
    assert conf["K"]["source"] == "weights" and by_file.inferred["source"]["stack_blocks"] == "option file"
    assert json.loads(json.dumps(by_file.describe()))["configuration"] == conf  # what report.json carries
    assert by_file.warnings == []
    # with neither, the value that changes the outputs is refused, naming flag and key
    with pytest.raises(ModelError, match=r"--stack-blocks or network_G\.flow\.stackRRDB\.blocks"):
        load_model(str(path))


def test_official_options_go_only_with_official_checkpoints():
    from flowaudit.adapters import load_model

    with pytest.raises(ModelError, match=r"--official-config: only for official checkpoints, not 'sr-affine'"):
        load_model("sr-affine", official_config=FIXTURES / "srflow-x4.yml")
    with pytest.raises(ModelError, match=r"--std-steps: only for official checkpoints"):
        load_model("sr-affine", official={"std_steps": [0, 1, 1]})


def test_configuration_lines_group_every_value_by_source(tmp_path):
    from flowaudit.render.text import configuration_lines

    sd = fixture("ncsr-x4")["state_dict"]
    # a file without scale / upscale: the flag gives it
    text = (FIXTURES / "ncsr-x4.yml").read_text().replace("scale: 4\n", "").replace("  upscale: 4\n", "")
    assert "scale" not in text.split("network_G")[0]
    (tmp_path / "ncsr.yml").write_text(text)
    adapter = off.build(sd, official_config=tmp_path / "ncsr.yml", scale=4)
    lines = configuration_lines(adapter.describe())
    assert lines[0] == "Configuration (ncsr), by source:" and all(len(line) <= 120 for line in lines)
    text = " ".join(line.strip() for line in lines)
    assert "weights: layout=ncsr, L=3, K=1," in text and "std_channels=3" in text
    assert "option file: stack_blocks=[0, 1] (network_G.flow.stackRRDB.blocks)" in text
    assert "std_steps=[0, 1, 1] (network_G.flow.S)" in text and "fs_ncsr=False (divide_freq)" in text
    assert "flag: scale=4 (--scale)" in text
    assert all(f"{name}=" in text for name in adapter.configuration)  # every value is on a line
    assert configuration_lines({"name": "x"}) == []  # nothing for other models
    # a key the file leaves out still says something: the official code's default, which a flag may not contradict
    with pytest.raises(ModelError, match=r"--affine-eps 0\.001 contradicts .*eps = 0\.0001 \(absent"):
        off.build(sd, official_config=FIXTURES / "ncsr-x4.yml", affine_eps=1e-3)


def test_cli_inspect_reads_the_option_file_and_shows_every_source(tmp_path):
    from click.testing import CliRunner

    from flowaudit.cli.main import cli

    path, runner = saved("srflow-x4", tmp_path), CliRunner()
    res = runner.invoke(
        cli, ["inspect", str(path), "--official-config", str(FIXTURES / "srflow-x4.yml"), "--device", "cpu"]
    )
    assert res.exit_code == 0, res.output
    assert "Configuration (srflow), by source:" in res.stdout and "flowaudit: warning" not in res.stderr
    text = " ".join(line.strip() for line in res.stdout.splitlines())
    assert "weights: layout=srflow, L=3, K=1" in text
    assert "option file: scale=4 (scale), stack_blocks=[0, 1] (network_G.flow.stackRRDB.blocks)" in text
    # a contradicting file: exit 2, one line naming the key, nothing on stdout
    bad = tmp_path / "bad.yml"
    bad.write_text((FIXTURES / "srflow-x4.yml").read_text().replace("    K: 1\n", "    K: 8\n"))
    res = runner.invoke(cli, ["inspect", str(path), "--official-config", str(bad), "--json"])
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr.strip().count("\n") == 0 and "network_G.flow.K is 8, but the weights have K = 1" in res.stderr
    # no file, no flag: exit 2 naming both
    res = runner.invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 2 and "--stack-blocks or network_G.flow.stackRRDB.blocks" in res.stderr


def test_every_official_flag_names_its_families_in_help():
    from click.testing import CliRunner

    from flowaudit.cli.main import cli

    help_text = " ".join(CliRunner().invoke(cli, ["inspect", "--help"]).stdout.split())
    for rule in oo.RULES:
        if rule.flag is None:
            continue
        families = {"srflow": "SRFlow", "ncsr": "NCSR", "fs-ncsr": "FS-NCSR", "spline": "spline", "llflow": "LLFlow"}
        at = help_text.index(rule.flag + " ")
        said = help_text[at : at + 200]
        assert all(families[f] in said for f in rule.families), (rule.flag, said)
    assert "--official-config FILE" in help_text
