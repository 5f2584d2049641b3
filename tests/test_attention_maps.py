"""`satrl attention` on checkpoints of real tiny training runs (the `trained_runs` fixture).

The runs are laid out in a store the way a fetch leaves them (run.json, checkpoints under the
paper's names, observations/). The grid's pixels are checked against maps computed here from
forward hooks on SB3's own loaded policy, independently of agents/interpret.py's stage-by-stage
pass and of its torch upsampling (cv2 here).
"""

from __future__ import annotations

import base64
import copy
import io
import json
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from agents.catalog import ATTENTION_TYPES
from orchestrator.cli import run
from orchestrator.map_grid import GridLayout, colormap_lut
from orchestrator.paths import paper_checkpoint_name
from orchestrator.settings import settings

pytestmark = pytest.mark.slow

GAME, SEED, STEPS = "Pong", 0, (512, 1024)
N_OBS = 4  # the tiny runs dump 2 observations at each of 512 and 1024 steps


@pytest.fixture(scope="module")
def store(trained_runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding the five tiny runs as `satrl fetch` lays them out."""
    root = tmp_path_factory.mktemp("store")
    for attn, run_dir in trained_runs.items():
        target = root / "main" / GAME / attn / str(SEED)
        (target / "checkpoints").mkdir(parents=True)
        shutil.copy2(run_dir / "run.json", target / "run.json")
        shutil.copytree(run_dir / "observations", target / "observations")
        for steps in STEPS:
            shutil.copy2(run_dir / "checkpoints" / f"model_checkpoint_{steps}_steps.zip",
                         target / "checkpoints" / paper_checkpoint_name(GAME, attn, SEED, steps))
    return root


@pytest.fixture()
def cli(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Any:
    """Run `satrl ARGS` in-process against `store`; returns (rc, stdout, stderr)."""
    monkeypatch.setenv("SATRL_HOME", str(tmp_path))
    monkeypatch.setenv("SATRL_STORE", str(store))
    monkeypatch.delenv("SATRL_EXPERIMENT", raising=False)
    settings.cache_clear()

    def invoke(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        rc = run(list(args))
        captured = capsys.readouterr()
        return rc, captured.out, captured.err

    yield invoke
    settings.cache_clear()


def checkpoint_of(store: Path, attn: str, steps: int = 1024) -> Path:
    return (store / "main" / GAME / attn / str(SEED) / "checkpoints"
            / paper_checkpoint_name(GAME, attn, SEED, steps))


def observations_of(store: Path, attn: str = "NA") -> list[Path]:
    folder = store / "main" / GAME / attn / str(SEED) / "observations"
    return sorted(folder.glob("*.npy"), key=lambda p: [int(x) for x in p.stem.split("_")[1:]])


def written(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*")) if out.exists() else []


# --- the figure of one store run ---------------------------------------------------------------


@pytest.mark.parametrize(("attn", "n_cols", "width_px"), [("NA", 3, 720), ("CWCA", 5, 1064)])
def test_store_run_grid_has_a_row_per_observation_and_na_no_attention_columns(
    cli: Any, store: Path, tmp_path: Path, attn: str, n_cols: int, width_px: int
) -> None:
    out = tmp_path / "out"
    rc, stdout, stderr = cli("attention", GAME, attn, str(SEED), "--out", str(out), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    stem = f"{GAME}_{attn}_{SEED}_1024_steps_attention"  # the newest checkpoint by default
    assert written(out) == sorted(f"{stem}.{ext}" for ext in ("csv", "json", "npz", "png"))
    # 84x84 cells at scale 2 (168 px) + 4 px gaps, a 200 px label column, a 30 px header.
    image = Image.open(out / f"{stem}.png")
    assert image.size == (width_px, 30 + N_OBS * 172 + 4)
    assert image.size == (GridLayout(N_OBS, n_cols).width_px, GridLayout(N_OBS, n_cols).height_px)
    meta = json.loads((out / f"{stem}.json").read_text())
    titles = [column["title"] for column in meta["columns"]]
    if attn == "NA":
        assert titles == ["input (4 frames)", "F1 = ReLU(c1)", "ReLU(c2)"]
    else:
        assert titles == ["input (4 frames)", "F1 = ReLU(c1)", "Y (attention)", "Y + F1",
                          "ReLU(c2)"]
    assert meta["policies"][0]["step"] == 1024 and meta["policies"][0]["n_actions"] == 6
    assert meta["policies"][0]["action_names"][:2] == ["NOOP", "FIRE"]
    with np.load(out / f"{stem}.npz") as arrays:
        stages = sorted(key for key in arrays.files if key != "observations")
        expected = ["f1", "f2", "input"] if attn == "NA" else ["attended", "f1", "f2", "input",
                                                               "y"]
        assert stages == sorted(f"{attn}/{s}" for s in expected)
        assert all(arrays[key].shape == (N_OBS, 84, 84) for key in stages)
        assert [Path(p).name for p in arrays["observations"]] == \
            [p.name for p in observations_of(store, attn)]
    rows = result["rows"]
    assert len(rows) == N_OBS and {row["attn"] for row in rows} == {attn}
    assert all(0 <= row["action"] < 6 and row["action_name"] for row in rows)
    csv_lines = (out / f"{stem}.csv").read_text().splitlines()
    assert csv_lines[0].startswith("observation,attn,step,action,action_name")
    assert len(csv_lines) == 1 + N_OBS


def _hooked_maps(checkpoint: Path, observations: list[np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                                            np.ndarray]:
    """Expected maps from forward hooks on SB3's own loaded policy (a trusted file of this test).

    Channel sums upsampled with cv2 (not torch), min-max normalised per observation; the greedy
    actions from SB3's predict. A map level may be off by 1 at most: 0.5 from quantisation, the
    rest float32 against float64.
    """
    from stable_baselines3 import PPO

    model = PPO.load(checkpoint, device="cpu")
    batch = np.concatenate(observations)
    actions, _ = model.predict(batch, deterministic=True)
    # A float64 copy of the extractor: Y is read as (Y + F1) - F1, which would lose Y's low bits
    # to cancellation in float32 where F1 is much larger than Y.
    extractor = copy.deepcopy(model.policy.features_extractor).double()
    captured: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor],
                 output: torch.Tensor) -> None:
            captured[name] = output.detach()
            captured[name + ".in"] = inputs[0].detach()
        return hook

    handles = [extractor.c1.register_forward_hook(keep("c1")),
               extractor.c2.register_forward_hook(keep("c2"))]
    if extractor.attention is not None:
        handles.append(extractor.attention.register_forward_hook(keep("attention")))
    extractor(torch.as_tensor(batch).double() / 255.0)
    for handle in handles:
        handle.remove()
    stages = {"input": captured["c1.in"], "f1": torch.relu(captured["c1"]),
              "f2": torch.relu(captured["c2"])}
    if "attention" in captured:
        stages["y"] = captured["attention"] - captured["attention.in"]
        stages["attended"] = captured["attention"]
    expected = {}
    for stage, tensor in stages.items():
        maps = []
        for summed in tensor.sum(dim=1).double().numpy():
            big = cv2.resize(summed, (84, 84), interpolation=cv2.INTER_LINEAR)
            maps.append((big - big.min()) / (big.max() - big.min()))
        expected[stage] = np.stack(maps)
    return expected, np.asarray(actions)


def _decode(pixels: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """RGB pixels -> the colour-map level (0..255) whose colour is nearest."""
    distance = ((pixels[..., None, :].astype(int) - lut[None, None].astype(int)) ** 2).sum(-1)
    return distance.argmin(-1)


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_grid_pixels_match_channel_sums_captured_with_forward_hooks(
    cli: Any, store: Path, tmp_path: Path, attn: str
) -> None:
    out = tmp_path / "out"
    rc, stdout, stderr = cli("attention", GAME, attn, str(SEED), "--out", str(out), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    observations = [np.load(p) for p in observations_of(store, attn)]
    expected, actions = _hooked_maps(checkpoint_of(store, attn), observations)
    assert [row["action"] for row in result["rows"]] == actions.tolist()

    meta = json.loads(Path(result["json"]).read_text())
    titles = {"input (4 frames)": "input", "F1 = ReLU(c1)": "f1", "Y (attention)": "y",
              "Y + F1": "attended", "ReLU(c2)": "f2"}
    stages = [titles[column["title"]] for column in meta["columns"]]
    assert sorted(stages) == sorted(expected)
    pixels = np.asarray(Image.open(result["png"]).convert("RGB"))
    layout = GridLayout(len(observations), len(stages), scale=2)
    for row in range(len(observations)):
        for col, stage in enumerate(stages):
            x, y = layout.cell_origin(row, col)
            cell = pixels[y:y + 168, x:x + 168]
            # Each map pixel is a 2x2 block of one colour.
            assert (cell[::2, ::2] == cell[1::2, 1::2]).all()
            lut = colormap_lut("gray" if stage == "input" else "inferno")
            levels = _decode(cell[::2, ::2], lut)
            error = np.abs(levels - 255.0 * expected[stage][row])
            assert error.max() <= 1.0, f"{attn} {stage} row {row}: off by {error.max():.2f} levels"
            # The border around a cell is background: the map starts exactly at cell_origin.
            assert (pixels[y - 1, x:x + 168] == 255).all()
            assert (pixels[y:y + 168, x - 1] == 255).all()


def test_gray_colour_map_writes_the_normalised_levels_themselves(cli: Any, store: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "out"
    rc, stdout, stderr = cli("attention", GAME, "SWA", str(SEED), "--out", str(out), "--json",
                             "--cmap", "gray", "--scale", "1")
    assert rc == 0, stderr
    result = json.loads(stdout)
    expected, _ = _hooked_maps(checkpoint_of(store, "SWA"),
                               [np.load(p) for p in observations_of(store, "SWA")])
    pixels = np.asarray(Image.open(result["png"]).convert("L")).astype(float)
    layout = GridLayout(N_OBS, 5, scale=1)
    for col, stage in enumerate(["input", "f1", "y", "attended", "f2"]):
        for row in range(N_OBS):
            x, y = layout.cell_origin(row, col)
            assert np.abs(pixels[y:y + 84, x:x + 84] - 255 * expected[stage][row]).max() <= 1.0
    with np.load(result["npz"]) as arrays:
        for stage in expected:
            np.testing.assert_allclose(arrays[f"SWA/{stage}"], expected[stage], atol=2e-3)


def test_step_picks_that_checkpoint_and_an_unknown_step_names_the_steps_there(
    cli: Any, tmp_path: Path
) -> None:
    rc, stdout, stderr = cli("attention", GAME, "CWRA", str(SEED), "--step", "512", "--out",
                             str(tmp_path / "a"), "--json")
    assert rc == 0, stderr
    early = json.loads(stdout)
    assert {row["step"] for row in early["rows"]} == {512}
    rc, stdout, _ = cli("attention", GAME, "CWRA", str(SEED), "--out", str(tmp_path / "b"),
                        "--json")
    late = json.loads(stdout)
    with np.load(early["npz"]) as a, np.load(late["npz"]) as b:
        assert np.array_equal(a["CWRA/input"], b["CWRA/input"])  # same observations
        assert not np.array_equal(a["CWRA/f1"], b["CWRA/f1"])  # other weights
    rc, _, stderr = cli("attention", GAME, "CWRA", str(SEED), "--step", "700", "--out",
                        str(tmp_path / "c"))
    assert rc == 2
    assert "no checkpoint at step 700" in stderr and "steps there: 512, 1024" in stderr
    assert not (tmp_path / "c").exists()


def test_checkpoint_option_reads_a_run_directory_as_it_is(
    cli: Any, trained_runs: dict[str, Path], tmp_path: Path
) -> None:
    checkpoint = trained_runs["CWRCA"] / "checkpoints" / "model_checkpoint_1024_steps.zip"
    rc, stdout, stderr = cli("attention", "--checkpoint", str(checkpoint), "--out",
                             str(tmp_path / "dir"), "--json")
    assert rc == 0, stderr  # type from run.json, observations from the run's observations/
    from_dir = json.loads(stdout)
    assert len(from_dir["rows"]) == N_OBS and from_dir["rows"][0]["attn"] == "CWRCA"
    assert from_dir["rows"][0]["action_name"]  # game from run.json: ALE's action names
    rc, stdout, _ = cli("attention", GAME, "CWRCA", str(SEED), "--out", str(tmp_path / "store"),
                        "--json")
    from_store = json.loads(stdout)
    with np.load(from_dir["npz"]) as a, np.load(from_store["npz"]) as b:
        assert all(np.array_equal(a[key], b[key]) for key in a.files if key != "observations")
    # --attn contradicting the run.json beside the checkpoint is refused.
    rc, _, stderr = cli("attention", "--checkpoint", str(checkpoint), "--attn", "SWA", "--out",
                        str(tmp_path / "x"))
    assert rc == 2 and "contradicts" in stderr


# --- refusals ----------------------------------------------------------------------------------


def _rezip(source: Path, target: Path, replace: dict[str, bytes]) -> Path:
    """A copy of an SB3 zip with some members replaced."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info.filename, replace.get(info.filename, old.read(info.filename)))
    return target


def _nature_cnn_checkpoint(path: Path) -> Path:
    """A real SB3 PPO CnnPolicy (NatureCNN) checkpoint on Pong, fresh."""
    from stable_baselines3 import PPO

    from agents.envs import make_train_env
    from agents.spec import SMOKE

    env = make_train_env(SMOKE.replace(n_envs=1), None, seed=0)
    try:
        PPO("CnnPolicy", env, n_steps=8, batch_size=8, device="cpu").save(path)
    finally:
        env.close()
    return path


def _state_of(checkpoint: Path) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(checkpoint) as archive:
        return torch.load(io.BytesIO(archive.read("policy.pth")), weights_only=True)


def _pth(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_checkpoints_of_another_architecture_are_refused_in_one_line(
    cli: Any, store: Path, tmp_path: Path
) -> None:
    obs = str(observations_of(store)[0])
    # Copies away from their run.json: the type comes from --attn alone, as for a checkpoint
    # from elsewhere, and only the weights can tell that it is wrong.
    na = Path(shutil.copy2(checkpoint_of(store, "NA"), tmp_path / "na.zip"))
    cwca = Path(shutil.copy2(checkpoint_of(store, "CWCA"), tmp_path / "cwca.zip"))
    wide = _state_of(na)
    for prefix in ("features_extractor", "pi_features_extractor", "vf_features_extractor"):
        wide[f"{prefix}.c2.weight"] = torch.zeros(64, 16, 4, 4)
        wide[f"{prefix}.c2.bias"] = torch.zeros(64)
    cases = {
        "nature": (_nature_cnn_checkpoint(tmp_path / "nature.zip"), "NA", "NatureCNN"),
        "block as NA": (cwca, "NA", "it has an attention block"),
        "NA as block": (na, "SWA", "it is an NA checkpoint"),
        "shapes": (_rezip(na, tmp_path / "wide.zip", {"policy.pth": _pth(wide)}), "NA",
                   "features_extractor.c2.weight is (64, 16, 4, 4), expected (32, 16, 4, 4)"),
        "no policy": (_zip_without_policy(na, tmp_path / "nopolicy.zip"), "NA", "no policy.pth"),
        "not a zip": (_write(tmp_path / "text.zip", b"hello"), "NA", "not a readable zip"),
    }
    for name, (checkpoint, attn, phrase) in cases.items():
        out = tmp_path / "out" / name.replace(" ", "_")
        rc, _, stderr = cli("attention", "--checkpoint", str(checkpoint), "--attn", attn,
                            "--observations", obs, "--out", str(out))
        assert rc == 2, name
        assert phrase in stderr, (name, stderr)
        assert len(stderr.strip().splitlines()) == 1, (name, stderr)
        assert not out.exists(), name


def _zip_without_policy(source: Path, target: Path) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            if info.filename != "policy.pth":
                new.writestr(info.filename, old.read(info.filename))
    return target


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


class _TouchOnUnpickle:
    """Unpickling this opens (so creates) `marker` for writing: code run from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_a_checkpoint_never_runs(cli: Any, store: Path, tmp_path: Path) -> None:
    from stable_baselines3.common.save_util import load_from_zip_file

    marker = tmp_path / "marker"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    source = checkpoint_of(store, "CWCA")
    with zipfile.ZipFile(source) as archive:
        data = json.loads(archive.read("data"))
    # SB3 cloudpickles objects in `data` as base64 under ":serialized:"; PPO.load unpickles them.
    data["policy_class"] = {":type:": "<class 'type'>",
                            ":serialized:": base64.b64encode(payload).decode()}
    evil_data = _rezip(source, tmp_path / "evil_data.zip",
                       {"data": json.dumps(data).encode()})
    out = tmp_path / "out"
    rc, _, stderr = cli("attention", "--checkpoint", str(evil_data), "--attn", "CWCA",
                        "--observations", str(observations_of(store)[0]), "--out", str(out))
    assert rc == 0, stderr  # the weights are fine and are used
    assert not marker.exists()
    # The crafted file is really hostile: SB3's own loader runs the payload.
    load_from_zip_file(evil_data, device="cpu")
    assert marker.exists()
    marker.unlink()

    state: dict[str, Any] = dict(_state_of(source))
    state["features_extractor.c1.weight"] = _TouchOnUnpickle(marker)
    evil_weights = _rezip(source, tmp_path / "evil_weights.zip", {"policy.pth": _pth(state)})
    rc, _, stderr = cli("attention", "--checkpoint", str(evil_weights), "--attn", "CWCA",
                        "--observations", str(observations_of(store)[0]), "--out",
                        str(tmp_path / "out2"))
    assert rc == 2 and "not a plain tensor state dict" in stderr
    assert not marker.exists() and not (tmp_path / "out2").exists()
    with zipfile.ZipFile(evil_weights) as archive:
        torch.load(io.BytesIO(archive.read("policy.pth")), weights_only=False)
    assert marker.exists()  # ... as plain torch.load would


# --- observations ------------------------------------------------------------------------------


def test_bad_observations_are_refused_with_what_is_wrong(cli: Any, store: Path,
                                                         tmp_path: Path) -> None:
    good = np.load(observations_of(store)[0])
    files = {
        "float.npy": (good.astype(np.float32), "dtype float32, expected uint8"),
        "squeezed.npy": (good[0], "shape (4, 84, 84), expected (1, 4, 84, 84)"),
        "objects.npy": (np.array([{"a": 1}], dtype=object), "not a plain .npy array"),
    }
    for name, (array, phrase) in files.items():
        path = tmp_path / name
        np.save(path, array, allow_pickle=True)
        out = tmp_path / ("out_" + name)
        rc, _, stderr = cli("attention", GAME, "NA", str(SEED), "--observations", str(path),
                            "--out", str(out))
        assert rc == 2 and phrase in stderr, (name, stderr)
        assert not out.exists()
    rc, _, stderr = cli("attention", GAME, "NA", str(SEED), "--observations",
                        str(tmp_path / "absent.npy"), "--out", str(tmp_path / "o"))
    assert rc == 2 and "does not exist" in stderr


def test_observations_named_for_another_game_are_refused(cli: Any, store: Path,
                                                        tmp_path: Path) -> None:
    """The published folder holds Assault's and Pong's dumps: Pong's policy takes Pong's only."""
    assert GAME != "Assault"
    for given, example in ((PUBLISHED, 1), (PUBLISHED / "*.npy", 1),
                           (PUBLISHED / "Assault_obs_3.npy", 3)):
        out = tmp_path / "out"
        rc, _, stderr = cli("attention", GAME, "NA", str(SEED), "--observations", str(given),
                            "--out", str(out))
        assert rc == 2 and stderr.strip().splitlines()[-1] == (
            f"satrl: --observations: files named for Assault, not {GAME}, e.g. "
            f"{PUBLISHED / f'Assault_obs_{example}.npy'}; "
            f"pass only {GAME}'s (e.g. '{PUBLISHED}/{GAME}_*.npy')"), given
        assert not out.exists()


def test_a_run_without_observation_dumps_asks_for_observations(
    cli: Any, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(store / "main" / GAME / "SWA", bare / "main" / GAME / "SWA")
    shutil.rmtree(bare / "main" / GAME / "SWA" / str(SEED) / "observations")
    monkeypatch.setenv("SATRL_STORE", str(bare))
    settings.cache_clear()
    rc, _, stderr = cli("attention", GAME, "SWA", str(SEED), "--out", str(tmp_path / "o"))
    assert rc == 2 and "pass --observations DIR|FILES" in stderr
    rc, _, stderr = cli("attention", GAME, "SWA", "42", "--out", str(tmp_path / "o"))
    assert rc == 2 and "no checkpoint in" in stderr and "satrl fetch" in stderr
    assert not (tmp_path / "o").exists()


# --- compare -----------------------------------------------------------------------------------


def test_compare_puts_every_fetched_type_side_by_side(
    cli: Any, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, stdout, stderr = cli("attention", GAME, "CWCA", str(SEED), "--compare", "--out",
                             str(tmp_path / "all"), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    meta = json.loads(Path(result["json"]).read_text())
    groups = [column["group"] for column in meta["columns"]]
    # One shared input column, then NA's 2 maps and 4 for each type with a block.
    assert len(groups) == 1 + 2 + 4 * 4
    assert [g.split()[0] for g in dict.fromkeys(g for g in groups if g)] == list(ATTENTION_TYPES)
    image = Image.open(result["png"])
    layout = GridLayout(N_OBS, 19, grouped=True)
    assert image.size == (layout.width_px, layout.height_px)
    assert len(result["rows"]) == N_OBS * 5 and result["skipped"] == []
    # Each type's maps are those of its own figure.
    rc, stdout, _ = cli("attention", GAME, "CWCA", str(SEED), "--out", str(tmp_path / "one"),
                        "--json")
    with np.load(result["npz"]) as both, np.load(json.loads(stdout)["npz"]) as one:
        assert np.array_equal(both["CWCA/y"], one["CWCA/y"])

    partial = tmp_path / "partial"
    for attn in ("NA", "CWRA"):
        shutil.copytree(store / "main" / GAME / attn, partial / "main" / GAME / attn)
    monkeypatch.setenv("SATRL_STORE", str(partial))
    settings.cache_clear()
    rc, stdout, stderr = cli("attention", GAME, "all", str(SEED), "--compare", "--step", "512",
                             "--out", str(tmp_path / "two"), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert result["skipped"] == ["SWA", "CWCA", "CWRCA"]
    assert [row["attn"] for row in result["rows"][:2]] == ["NA", "CWRA"]
    assert Image.open(result["png"]).size == (GridLayout(N_OBS, 1 + 2 + 4, grouped=True).width_px,
                                              GridLayout(N_OBS, 7, grouped=True).height_px)


def test_command_line_mistakes_are_one_line(cli: Any, tmp_path: Path) -> None:
    for args, phrase in [
        (["attention", GAME, "CWXA", "0"], "unknown attention type 'CWXA'"),
        (["attention", "Pongg", "NA", "0"], "unknown game 'Pongg'"),
        (["attention", GAME, "NA"], "give GAME ATTN SEED"),
        (["attention", GAME, "NA", "0", "--attn", "SWA"], "--attn goes with --checkpoint"),
        (["attention", GAME, "NA", "0", "--cmap", "infernoo"], "unknown colour map 'infernoo'"),
        (["attention", "--checkpoint", str(tmp_path / "none.zip"), "--attn", "NA"],
         "does not exist"),
    ]:
        rc, _, stderr = cli(*args, "--out", str(tmp_path / "o"))
        assert rc == 2 and phrase in stderr, (args, stderr)
    assert not (tmp_path / "o").exists()


# --- the published observations through freshly initialised models ----------------------------

PUBLISHED = Path(__file__).resolve().parents[2] / "shared" / "reference" / "observations"
if not PUBLISHED.exists():  # a checkout beside shared/ (CI) or the main work tree
    PUBLISHED = Path("/work/shared/reference/observations")


@pytest.mark.parametrize(("game", "n_actions"), [("Pong", 6), ("Assault", 7)])
def test_published_observations_through_fresh_models_of_every_type(
    cli: Any, tmp_path: Path, game: str, n_actions: int
) -> None:
    files = sorted(PUBLISHED.glob(f"{game}_obs_*.npy"))
    assert len(files) == 10, f"expected the 10 published {game} dumps in {PUBLISHED}"
    rc, stdout, stderr = cli("attention", game, "all", "0", "--fresh", "--compare",
                             "--observations", str(PUBLISHED / f"{game}_obs_*.npy"),
                             "--out", str(tmp_path), "--json")
    assert rc == 0, stderr
    result = json.loads(stdout)
    assert len(result["rows"]) == 10 * 5
    assert Image.open(result["png"]).size == (GridLayout(10, 19, grouped=True).width_px,
                                              GridLayout(10, 19, grouped=True).height_px)
    meta = json.loads(Path(result["json"]).read_text())
    assert {p["n_actions"] for p in meta["policies"]} == {n_actions}
    assert all(len(p["action_names"]) == n_actions for p in meta["policies"])
    with np.load(result["npz"]) as arrays:
        for key in arrays.files:
            if key == "observations":
                continue
            maps = arrays[key]
            assert maps.shape == (10, 84, 84) and np.isfinite(maps).all(), key
            # Every map spans [0, 1]: nothing collapsed to a constant on real frames.
            assert np.allclose(maps.min(axis=(1, 2)), 0) and np.allclose(maps.max(axis=(1, 2)), 1)
        # The input column is the observation itself, channel-summed.
        shown = [Path(p) for p in arrays["observations"]]
        assert sorted(shown) == files  # all ten, in natural order (obs_2 before obs_10)
        assert [p.name for p in shown[:2]] == [f"{game}_obs_1.npy", f"{game}_obs_2.npy"]
        for row, path in enumerate(shown):
            summed = np.load(path)[0].astype(float).sum(0)
            expected = (summed - summed.min()) / (summed.max() - summed.min())
            np.testing.assert_allclose(arrays["NA/input"][row], expected, atol=1e-6)
        # The types differ where they should: the same seed gives every block type the same c1
        # (built first), so F1 agrees while Y differs between layouts.
        np.testing.assert_allclose(arrays["SWA/f1"], arrays["CWCA/f1"], atol=1e-6)
        assert not np.allclose(arrays["SWA/y"], arrays["CWCA/y"], atol=1e-3)


# --- a checkpoint whose compressed policy.pth rotted ------------------------------------------


def _flip(data: bytes, start: int, count: int = 64) -> bytes:
    rotten = bytearray(data)
    for at in range(start, start + count):
        rotten[at] ^= 0xFF
    return bytes(rotten)


@pytest.mark.parametrize("method", [zipfile.ZIP_DEFLATED, zipfile.ZIP_LZMA],
                         ids=["deflate", "lzma"])
def test_a_checkpoint_with_a_rotten_compressed_member_is_refused_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    method: int,
) -> None:
    """zipfile checks the CRC only after inflating: flipped bytes inside a deflated (or LZMA)
    member raise the decompressor's own error, which must not escape as a traceback."""
    from agents.interpret import fresh_policy

    good = tmp_path / "good.zip"
    with zipfile.ZipFile(good, "w", method) as archive:
        archive.writestr("policy.pth", _pth(fresh_policy("CWCA", 6, seed=0).state_dict()))
    with zipfile.ZipFile(good) as archive:
        info = archive.getinfo("policy.pth")
    # Inside the compressed bytes: past the local header (30 bytes + name + extra).
    start = info.header_offset + 30 + len(info.filename) + 200
    assert start + 64 < info.header_offset + info.compress_size
    bitrot = _write(tmp_path / "bitrot.zip", _flip(good.read_bytes(), start))
    obs = tmp_path / "obs.npy"
    np.save(obs, np.random.default_rng(0).integers(0, 255, (1, 4, 84, 84), dtype=np.uint8))
    monkeypatch.setenv("SATRL_HOME", str(tmp_path))
    settings.cache_clear()
    try:
        capsys.readouterr()
        rc = run(["attention", "--checkpoint", str(bitrot), "--attn", "CWCA",
                  "--observations", str(obs), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
    finally:
        settings.cache_clear()
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert f"{bitrot}: policy.pth cannot be decompressed" in err
    assert not (tmp_path / "out").exists()
