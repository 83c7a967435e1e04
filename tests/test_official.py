"""Official checkpoints: recognition by key layout and equivalence with the authors' own code.

The fixtures in ``tests/fixtures/official/`` were written by running the official SRFlow, NCSR,
FS-NCSR, robustNF (spline) and LLFlow network code on small random configurations (see the README
there); they hold the official state dict, the inputs and the official outputs. Every figure here is
compared at ≤ 1e-5 relative (max abs error over max abs value), float32 on CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from flowaudit.adapters import ModelError, load_model
from flowaudit.adapters import official as off

import flowaudit

FIXTURES = Path(__file__).parent / "fixtures" / "official"
NAMES = ("srflow-x4", "srflow-x8", "ncsr-x4", "fs-ncsr-x4", "spline-x4", "llflow")
LAYOUT = {
    "srflow-x4": "srflow",
    "srflow-x8": "srflow",
    "ncsr-x4": "ncsr",
    "fs-ncsr-x4": "ncsr",
    "spline-x4": "spline",
    "llflow": "llflow",
}
TOL = 1e-5


def fixture(name: str) -> dict:
    fx = torch.load(FIXTURES / f"{name}.pt", weights_only=True)
    if "state_dict" not in fx:  # FS-NCSR shares NCSR's weights (identical keys)
        fx["state_dict"] = torch.load(FIXTURES / fx["weights_from"], weights_only=True)["state_dict"]
    return fx


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))


def options(name: str) -> dict:
    """What the fixture's weights cannot say, as flags: its stacked blocks, and NCSR's S and FS-NCSR switch."""
    cfg = fixture(name)["config"]
    flags = {"stack_blocks": cfg["blocks"]}
    if "S" in cfg:
        flags.update(std_steps=cfg["S"], fs_ncsr=name.startswith("fs-"))
    return flags


@pytest.fixture(scope="module", params=NAMES)
def case(request):
    name = request.param
    fx = fixture(name)
    return name, fx, off.build(fx["state_dict"], name, **options(name))


def test_encode_matches_the_official_code(case):
    name, fx, adapter = case
    y = fx["lr"]
    with torch.no_grad():
        latents, logdet = adapter.forward(fx["gt"], y)
        official = adapter.to_official_latents(y, latents)
    assert len(official) == len(fx["encode_z"])  # split latents first, top latent last
    for got, want in zip(official, fx["encode_z"]):
        assert got.shape == want.shape and rel(got, want) <= TOL, name
    # official logdet = ours + each split latent's log N(ε; 0, I) (Split2d adds a log-density)
    assert rel(adapter.official_logdet(latents, logdet), fx["encode_logdet"]) <= TOL, name


@pytest.mark.parametrize("name", ["ncsr-x4", "fs-ncsr-x4"])
def test_noise_steps_past_k_mean_every_step_as_in_the_official_code(name):
    """The released option files say S = [0, 16, 16]; on weights of fewer steps a level (K = 1 here) the official
    code uses the noise in every step, as S = [0, K, K] does. The fixture's outputs, made by the official code with
    S = [0, 1, 1], are what S = [0, 16, 16] gives; a level without an entry is refused."""
    fx = fixture(name)
    flags = {**options(name), "std_steps": [0, 16, 16]}
    adapter = off.build(fx["state_dict"], name, **flags)
    with torch.no_grad():
        latents, _ = adapter.forward(fx["gt"], fx["lr"])
        official = adapter.to_official_latents(fx["lr"], latents)
    for got, want in zip(official, fx["encode_z"], strict=True):
        assert rel(got, want) <= TOL
    with pytest.raises(ModelError, match=r"--std-steps \[0, 16\], but the weights have L = 3 levels"):
        off.build(fx["state_dict"], name, **{**flags, "std_steps": [0, 16]})


def test_log_prob_equals_the_official_objective(case):
    name, fx, adapter = case
    y = fx["lr"]
    with torch.no_grad():
        top = fx["encode_z"][-1].flatten(1)
        if adapter.layout == "llflow":  # conditional prior N(μ(y), I) on the top latent
            top = top - fx["prior_mean"].flatten(1)
        objective = fx["encode_logdet"] - 0.5 * (top**2).sum(1) - 0.5 * top.shape[1] * math.log(2 * math.pi)
        assert rel(adapter.log_prob(fx["gt"], y), objective) <= TOL, name


@pytest.mark.parametrize("which", [0, 1])
def test_fixed_latent_samples_match_at_two_temperatures(case, which):
    name, fx, adapter = case
    y, t = fx["lr"], fx["temperatures"][which]
    if adapter.layout == "llflow":  # official stochastic sampling passes z = μ(y) + τε as epses=[z]
        epses = [fx["prior_mean"] + t * fx["eps"][0]]
    else:  # epses: split latents first, top latent last, heat already applied
        epses = [t * e for e in fx["eps"]]
    with torch.no_grad():
        x = adapter.sample(y, adapter.from_official_latents(y, epses))
    assert rel(x, fx["samples"][which]) <= TOL, (name, t)


def test_round_trip_from_official_latents(case):
    name, fx, adapter = case
    y = fx["lr"]
    with torch.no_grad():
        x = adapter.sample(y, adapter.from_official_latents(y, fx["encode_z"]))
    assert rel(x, fx["roundtrip"]) <= TOL, name
    assert rel(x, fx["gt"]) <= 1e-4, name  # and the official round trip itself is the identity


def test_llflow_inference_and_input_pipeline():
    fx = fixture("llflow")
    adapter = off.build(fx["state_dict"], **options("llflow"))
    from flowaudit.reference_models.lowlight import llflow_input

    # the official loader's input (cv2.equalizeHist of the uint8 image, log of the image) is ours
    assert torch.allclose(llflow_input(fx["lr"]), fx["encoder_input"], atol=1e-6)
    with torch.no_grad():
        assert rel(adapter.model.enhance(fx["lr"]), fx["enhance"]) <= TOL  # official inference: z = μ(y)


@pytest.mark.parametrize("name", NAMES)
def test_recognised_with_the_inferred_configuration(name, tmp_path):
    fx = fixture(name)
    path = tmp_path / f"{name}.pth"
    torch.save(fx["state_dict"], path)
    adapter = load_model(str(path), official=options(name))
    cfg, inf = fx["config"], adapter.inferred
    assert adapter.family == "official" and adapter.layout == LAYOUT[name] == inf["layout"]
    assert (inf["L"], inf["K"], inf["nf"], inf["nb"], inf["gc"], inf["hidden_channels"]) == (
        cfg["L"],
        cfg["K"],
        cfg["nf"],
        cfg["nb"],
        cfg["gc"],
        cfg["hidden"],
    )
    assert inf["conditioning_channels"] == cfg["nf"] * (1 + len(cfg["blocks"])) and inf["stack_blocks"] == cfg["blocks"]
    assert inf["scale"] == cfg.get("scale", 1)
    assert inf["n_transition"] == cfg.get("n_transition", 2)
    assert inf.get("correct_splits") == cfg.get("correct_splits")
    assert inf.get("std_steps") == cfg.get("S") and inf["fixed_invconv"] == (name == "spline-x4")
    assert inf["source"]["K"] == "weights" and inf["source"]["stack_blocks"] == "flag"
    assert adapter.configuration["stack_blocks"] == {"value": cfg["blocks"], "source": "flag", "key": "--stack-blocks"}
    if name != "llflow":
        assert inf["fs_ncsr"] == name.startswith("fs-") and adapter.model.residual == name.startswith("fs-")
    kinds = {s.kind for s in adapter.sites()}
    assert kinds == ({"modified-rq-spline", "prior"} if name == "spline-x4" else {"affine", "prior"})


def test_wrapped_and_prefixed_state_dicts_load_the_same(tmp_path):
    fx = fixture("srflow-x4")
    sd = fx["state_dict"]
    unused = {"flowUpsamplerNet.f.0.weight": torch.zeros(96, 12, 3, 3), "flowUpsamplerNet.f.0.bias": torch.zeros(96)}
    want = off.build(sd, **options("srflow-x4")).fingerprint()
    for i, obj in enumerate(
        [{"state_dict": sd}, {"params": sd}, {f"module.{k}": v for k, v in sd.items()}, {**sd, **unused}]
    ):
        path = tmp_path / f"w{i}.pth"
        torch.save(obj, path)
        assert load_model(str(path), official=options("srflow-x4")).fingerprint() == want


def test_fs_ncsr_is_a_flag_not_a_layout():
    sd = fixture("ncsr-x4")["state_dict"]
    flags = {k: v for k, v in options("ncsr-x4").items() if k != "fs_ncsr"}
    assert off.recognise(sd)[0] == off.recognise(sd, fs_ncsr=True)[0] == "ncsr"
    assert off.build(sd, fs_ncsr=False, **flags).model.residual is False
    assert off.build(sd, fs_ncsr=True, **flags).model.residual is True
    with pytest.raises(ModelError, match=r"fs_ncsr.*--fs-ncsr or divide_freq"):  # never assumed either way
        off.build(sd, **flags)
    with pytest.raises(ModelError, match="--fs-ncsr applies to ncsr, fs-ncsr, spline checkpoints; .* srflow's"):
        off.build(fixture("srflow-x4")["state_dict"], fs_ncsr=True, **options("srflow-x4"))


def test_x2_is_an_option_the_weights_cannot_tell_from_x4():
    sd, flags = fixture("ncsr-x4")["state_dict"], options("ncsr-x4")
    adapter = off.build(sd, scale=2, **flags)
    assert adapter.inferred["scale"] == adapter.scale == 2 and adapter.inferred["source"]["scale"] == "flag"
    with torch.no_grad():
        assert adapter.sample(
            torch.rand(1, 3, 8, 8), adapter.sample_latents(torch.rand(1, 3, 8, 8), 0.5, None)
        ).shape == (1, 3, 16, 16)
    with pytest.raises(ModelError, match=r"--scale 8, but the weights have a ×2 or ×4 encoder"):
        off.build(sd, scale=8, **flags)
    # not given: ×4 (what a ×2 or ×4 encoder most often is), said in the warning line
    adapter = off.build(sd, **flags)
    assert adapter.scale == 4 and adapter.inferred["source"]["scale"] == "default"
    assert "scale=4" in adapter.warning_line()


def test_affine_eps_is_an_option():
    sd, flags = fixture("ncsr-x4")["state_dict"], options("ncsr-x4")
    assert {s.kind for s in off.build(sd, affine_eps=0.1, **flags).sites()} == {"affine-bounded", "prior"}
    adapter = off.build(sd, affine_eps=1e-3, **flags)
    assert adapter.inferred["source"]["affine_eps"] == "flag"
    assert {m.eps for m in adapter.model.modules() if type(m).__name__ == "Affine"} == {1e-3}


def test_a_random_state_dict_names_the_closest_layout(tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "random.pth"
    torch.save({f"encoder.block{i}.weight": torch.randn(4, 4, generator=g) for i in range(5)}, path)
    with pytest.raises(ModelError, match=r"closest layout: \w+ .*first mismatching keys: missing "):
        load_model(str(path))
    # an official layout with a wrong shape names the key
    sd = dict(fixture("srflow-x4")["state_dict"])
    sd["RRDB.upconv1.weight"] = torch.zeros(4, 4, 1, 1)
    with pytest.raises(off.LayoutError, match=r"looks like srflow .*RRDB\.upconv1\.weight"):
        off.build(sd, **options("srflow-x4"))
    # a truncated one (coupling sub-net gone) still gets the closest layout and its missing keys
    sd = {k: v for k, v in fixture("llflow")["state_dict"].items() if ".affine." not in k}
    with pytest.raises(off.LayoutError, match=r"closest layout: llflow .*missing flowUpsamplerNet"):
        off.build(sd)


def test_adapt_takes_an_official_state_dict_and_the_audit_runs():
    fx = fixture("srflow-x4")
    with pytest.raises(ModelError, match=r"--stack-blocks or network_G\.flow\.stackRRDB\.blocks"):
        flowaudit.adapt(fx["state_dict"])  # which trunk blocks are stacked is not in the weights
    adapter = flowaudit.adapt(off.build(fx["state_dict"], official_config=FIXTURES / "srflow-x4.yml"))
    assert adapter.family == "official" and adapter.inferred["scale"] == 4
    model = json.loads(flowaudit.inspect(adapter, fx["lr"], samples=2, device="cpu").to_json())["model"]
    assert model["adapter"] == "official"
    assert {s["kind"] for s in model["sites"]} == {"affine", "prior"}
    assert {s["remark2"]["verdict"] for s in model["sites"] if s["kind"] == "affine"} == {"violates"}


def test_loaded_actnorm_is_never_reinitialised_from_data():
    fx = fixture("srflow-x4")
    adapter = off.build(fx["state_dict"], **options("srflow-x4"))
    model = adapter.model
    for m in model.modules():  # as after a non-strict load that left the buffer unset
        if hasattr(m, "initialized"):
            m.initialized.fill_(False)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith((".bias", ".logs"))}
    model.train()
    with torch.no_grad():
        model(fx["gt"], fx["lr"])
    model.eval()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_bundled_checkpoints_keep_pre_activation_features_new_models_read_the_official_ones():
    from flowaudit.reference_models.lowlight import LLFlow
    from flowaudit.reference_models.sr import SRFlow

    from flowaudit import reference_models as rm

    assert rm.load("sr-affine").config["official_features"] is False
    assert rm.load("lowlight-affine").RRDB.official_features is False
    assert SRFlow(nf=4, nb=2, gc=2, hidden_channels=4, K=1, patch=16).config["official_features"] is True
    assert LLFlow(nf=4, nb=2, gc=2, hidden_channels=4, K=1, patch=16).RRDB.official_features is True


def test_cli_reports_what_it_inferred(tmp_path):
    """`flowaudit inspect CHECKPOINT --json`: the model entry says the layout and the inferred configuration;
    --fs-ncsr and --stack-blocks reach the recogniser."""
    import json

    from click.testing import CliRunner

    from flowaudit.cli.main import cli

    fx = fixture("ncsr-x4")
    path = tmp_path / "ncsr.pth"
    torch.save(fx["state_dict"], path)
    blocks = ",".join(str(b) for b in fx["config"]["blocks"])
    steps = ",".join(str(s) for s in fx["config"]["S"])
    runner = CliRunner()
    base = ["inspect", str(path), "--json", "--device", "cpu", "--stack-blocks", blocks, "--std-steps", steps]
    plain = runner.invoke(cli, [*base, "--no-fs-ncsr"])
    assert plain.exit_code == 0, plain.output
    model = json.loads(plain.stdout)["model"]
    # what no source gave and cannot change much: one warning line on stderr
    warned = [line for line in plain.stderr.splitlines() if line.startswith("flowaudit: warning:")]
    assert len(warned) == 1 and "scale=4" in warned[0] and "affine_eps=0.0001" in warned[0]
    assert model["configuration"]["std_steps"] == {"value": fx["config"]["S"], "source": "flag", "key": "--std-steps"}
    assert model["adapter"] == "official" and model["layout"] == "ncsr" and model["inferred"]["fs_ncsr"] is False
    assert model["inferred"]["source"]["stack_blocks"] == "flag"
    fs = runner.invoke(cli, [*base, "--fs-ncsr"])
    assert fs.exit_code == 0, fs.output
    assert json.loads(fs.stdout)["model"]["inferred"]["fs_ncsr"] is True
    # without --fs-ncsr / --no-fs-ncsr nothing says which it is: exit 2 naming the flag and the option key
    unsaid = runner.invoke(cli, base)
    assert unsaid.exit_code == 2 and "--fs-ncsr or divide_freq" in unsaid.stderr
    bad = runner.invoke(cli, ["inspect", str(path), "--stack-blocks", "one,two"])
    assert bad.exit_code == 2


def test_inspect_without_data_probes_small_images_and_finds_the_same_sites():
    """Drawn conditions carry no content: inspect draws 8 images of the smallest size the squeezes take, not
    the 160-pixel training patch, and the sites sampling calls are the same at either size."""
    adapter = off.build(fixture("srflow-x4")["state_dict"], **options("srflow-x4"))
    assert adapter.condition_shape == (3, 40, 40) and adapter.probe_shape == (3, 8, 8)
    adapter.check_condition_shape(adapter.probe_shape)  # a size the model takes
    data = json.loads(flowaudit.inspect(adapter, samples=2, device="cpu").to_json())["data"]["in"]
    assert data == {"kind": "drawn", "n": 8, "shape": [3, 8, 8]}
    small = {s.name for s in adapter.sites()}
    full = off.build(fixture("srflow-x4")["state_dict"], **options("srflow-x4"))
    full.__class__ = type("FullSize", (type(full),), {"probe_shape": property(lambda self: self.condition_shape)})
    assert {s.name for s in full.sites()} == small and small


def test_loaded_weights_are_the_checkpoint_values_in_float32():
    """The network is built without random initialisation and takes the checkpoint's tensors (half precision
    widened to float32); every weight equals the file's, every ActNorm counts as initialised."""
    state = {k: v.half() if v.is_floating_point() else v for k, v in fixture("srflow-x4")["state_dict"].items()}
    model = off.build(state, **options("srflow-x4")).model
    ours = model.state_dict()
    assert all(v.dtype == torch.float32 for v in ours.values() if v.is_floating_point())
    for k, v in state.items():
        if k in ours:
            assert torch.equal(ours[k], v.float().reshape(ours[k].shape)), k
    assert all(bool(m.initialized) for m in model.modules() if hasattr(m, "initialized"))
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_inspecting_an_official_checkpoint_imports_no_compiler_stack_and_no_scikit_learn(tmp_path):
    """Built on the meta device, the network skips its random initialisation (torch's meta kernels for
    ``normal_``, ``randn`` and ``qr`` import sympy and dynamo, some 80 MB resident), and inspect never fits a
    Gaussian (scikit-learn and scipy.stats, some 80 MB more): neither is imported, in a fresh interpreter."""
    import subprocess
    import sys

    torch.save(fixture("srflow-x4")["state_dict"], tmp_path / "net.pth")
    yml = str(FIXTURES / "srflow-x4.yml")
    code = (
        "import sys, flowaudit\n"
        "from flowaudit.adapters import load_model\n"
        f"a = load_model({str(tmp_path / 'net.pth')!r}, official_config={yml!r})\n"
        "flowaudit.inspect(a, samples=2, device='cpu', progress=False)\n"
        "print(sorted(m for m in ('sympy', 'torch._dynamo', 'sklearn', 'scipy.stats') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == "[]"
