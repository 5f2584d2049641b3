"""The fast path's environments follow the reference path's protocol (AGENT.md, agents/envs.py).

CPU only: ale-py's AtariVectorEnv runs here as it does on a GPU node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

from agents import rundir
from agents.envs import make_atari_env
from agents.fast.ale_env import AtariVectorSource
from agents.fast.engine import FastPPO, policy_outputs
from agents.spec import SMOKE, RunSpec, SpecError

BREAKOUT = SMOKE.replace(game="Breakout", noop_max=0, n_envs=1, engine="fast",
                         env_backend="ale_vector")

#: Largest per-pixel difference allowed between the two paths' 84x84 frames on Breakout
#: (measured: none; see ale_env.DIFFERENCES for why other games may differ by a few levels).
FRAME_BOUND = 0


def _settle(source: AtariVectorSource, frame: np.ndarray) -> tuple[np.ndarray, list[Any]]:
    """Run the hidden steps SB3 runs inside a reset; returns the learner's next frame."""
    episodes: list[Any] = []
    while not source.ready()[0]:
        send, visible = source.actions_to_send(np.zeros(1, dtype=np.int64))
        assert not visible[0]
        outcome = source.step(send)
        episodes += outcome.episodes
        frame = outcome.frames[0]
    return frame, episodes


def test_breakout_matches_the_reference_path_step_for_step() -> None:
    """No-op starts off, 1,500 learner steps of actions that lose lives and whole games: the
    learner's rewards, life-loss ends, game ends, scores and lengths are the reference path's
    (SB3 AtariWrapper with the Monitor inside), and frames differ by at most FRAME_BOUND."""
    reference = make_atari_env(BREAKOUT, None)
    source = AtariVectorSource(BREAKOUT)
    actions = np.random.default_rng(0).choice(4, size=1500, p=[0.1, 0.3, 0.3, 0.3])
    obs, _ = reference.reset(seed=5)
    ref_frames, fast_frames = [obs[..., 0]], [_settle(source, source.reset(5))[0]]
    ref_steps, fast_steps = [], []
    for action in actions:
        obs, reward, terminated, truncated, info = reference.step(int(action))
        done = terminated or truncated
        episode = info.get("episode")
        if done:
            obs, _ = reference.reset()  # what the VecEnv does: SB3's hidden steps run here
        ref_steps.append((reward, done, None if episode is None else
                          (float(episode["r"]), int(episode["l"]))))
        ref_frames.append(obs[..., 0])

        send, visible = source.actions_to_send(np.array([action]))
        assert visible[0]
        outcome = source.step(send)
        frame, more = _settle(source, outcome.frames[0])
        episodes = outcome.episodes + more
        fast_steps.append((float(outcome.reward[0]), bool(outcome.done[0]),
                           None if not episodes else (episodes[0][1], episodes[0][2])))
        fast_frames.append(frame)
    reference.close()
    source.close()

    assert [s[0] for s in fast_steps] == [s[0] for s in ref_steps]
    assert [s[1] for s in fast_steps] == [s[1] for s in ref_steps]
    games = [s[2] for s in ref_steps if s[2] is not None]
    assert [s[2] for s in fast_steps if s[2] is not None] == games
    life_losses = sum(s[1] for s in ref_steps) - len(games)
    assert len(games) >= 5 and life_losses >= 4 * len(games)  # the sequence did lose lives
    assert any(score > 0 for score, _ in games)
    diff = np.abs(np.stack(ref_frames).astype(int) - np.stack(fast_frames).astype(int))
    assert diff.max() <= FRAME_BOUND


def test_rewards_are_clipped_for_the_learner_only() -> None:
    """Space Invaders pays 5 to 30 points an invader: the learner sees 1, the score the sum."""
    invaders = BREAKOUT.replace(game="SpaceInvaders")
    source = AtariVectorSource(invaders.replace(clip_reward=False))
    clipped = AtariVectorSource(invaders)
    actions = np.random.default_rng(0).integers(0, 6, size=600)
    for src in (source, clipped):
        _settle(src, src.reset(5))
    raw_rewards, learner_rewards, scores = [], [], []
    for action in actions:
        for src, sink in ((source, raw_rewards), (clipped, learner_rewards)):
            send, _ = src.actions_to_send(np.array([action]))
            outcome = src.step(send)
            sink.append(float(outcome.reward[0]))
            if src is clipped:
                scores += [score for _, score, _ in outcome.episodes]
            _settle(src, outcome.frames[0])
    assert set(learner_rewards) <= {0.0, 1.0}
    assert np.array_equal(np.sign(raw_rewards), learner_rewards)
    assert max(raw_rewards) > 1  # not vacuous: some brick was worth more than 1 point
    assert all(float(s).is_integer() for s in scores)


def test_truncation_bootstraps_with_the_terminal_value() -> None:
    """A 60-frame time limit truncates every game: the engine adds gamma * V(terminal stack)
    to that transition's reward, the transition ends the learner's episode, and nothing is
    added anywhere else."""
    spec = SMOKE.replace(game="Breakout", n_envs=2, n_steps=64, batch_size=64, engine="fast",
                         env_backend="ale_vector")
    source = AtariVectorSource(spec, max_frames=60)
    model = PPO("CnnPolicy", source.stand_in(), n_steps=64, batch_size=64,
                policy_kwargs={"net_arch": []}, seed=0, device="cpu")
    engine = FastPPO(model, source)
    seen: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    receive = source.receive

    def spy() -> Any:
        outcome = receive()
        seen.append((outcome.frames.copy(), outcome.bootstrap.copy(), outcome.done.copy()))
        return outcome

    source.receive = spy  # type: ignore[method-assign]
    engine.start(seed=0)

    class Quiet:
        def on_rollout_start(self) -> None: ...
        def on_rollout_end(self) -> None: ...
        def update_locals(self, _: Any) -> None: ...
        def on_step(self) -> bool:
            return True

    model.num_timesteps = 0
    assert engine.collect_rollout(Quiet())  # type: ignore[arg-type]
    assert any(b.any() for _, b, _ in seen)
    # Every step counted; more than 64, since hidden FIRE steps after each game end lag an env.
    assert engine.rollout_vector_steps == [len(seen)] and len(seen) > 64
    boot = engine.bootstrap[: engine.size].view(2, 64)
    flagged = boot != 0
    # Each truncated transition: its obs is the stack before the terminal frame.
    truncations = 0
    for env in range(2):
        for t in torch.nonzero(flagged[env]).flatten().tolist():
            truncations += 1
            row = env * 64 + t
            obs = engine.obs[row]
            # The terminal frame is the newest frame of the step that recorded this row.
            candidates = [f[env] for f, b, _ in seen if b[env]]
            terminal_stacks = [torch.cat((obs[1:], torch.from_numpy(f)[None]))[None]
                               for f in candidates]
            terminal_values = [policy_outputs(model.policy, s)[1] for s in terminal_stacks]
            assert any(torch.allclose(boot[env, t], 0.99 * v[0], atol=1e-5)
                       for v in terminal_values)
            if t + 1 < 64:
                assert engine.starts_host[env, t + 1] == 1.0  # the next obs begins an episode
    assert truncations == sum(int(b.sum()) for _, b, _ in seen)
    source.close()


def test_spec_pairs_the_fast_engine_with_the_vector_env() -> None:
    with pytest.raises(SpecError, match="engine fast cannot run env_backend dummy"):
        SMOKE.replace(engine="fast")
    with pytest.raises(SpecError, match="engine sb3 cannot run env_backend ale_vector"):
        SMOKE.replace(env_backend="ale_vector")
    spec = SMOKE.replace(engine="fast", env_backend="ale_vector")
    assert spec.spec_hash() == SMOKE.spec_hash()  # execution fields: not hashed
    assert RunSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="cuda_graphs needs engine fast on a CUDA device"):
        SMOKE.replace(cuda_graphs=True)
    with pytest.raises(SpecError, match="not engine fast on device cpu"):
        spec.replace(device="cpu", cuda_graphs=True)
    graphs = spec.replace(device="auto", cuda_graphs=True)
    assert graphs.spec_hash() == SMOKE.spec_hash()
    assert RunSpec.from_dict(graphs.to_dict()) == graphs


def test_worker_on_the_fast_path_writes_the_run_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m agents.train` with engine=fast (in-process, SB3's own loop made to raise):
    every file of the contract, checkpoints PPO.load opens, full-game evaluations."""
    from agents.train import main

    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the fast path called SB3's own PPO loop")

    monkeypatch.setattr(PPO, "train", refuse)
    monkeypatch.setattr(PPO, "collect_rollouts", refuse)
    run_dir = tmp_path / "run"
    spec = SMOKE.replace(game="Breakout", engine="fast", env_backend="ale_vector",
                         total_timesteps=1024, eval_every_steps=512, checkpoint_every_steps=512,
                         obs_dump_every_steps=512, device="cpu")
    rundir.write_run_json(run_dir, spec)
    assert main([str(run_dir)]) == 0
    exit_info = rundir.read_json(run_dir / rundir.EXIT_JSON)
    assert exit_info["reason"] == "done" and exit_info["timesteps"] == 1024
    assert rundir.read_json(run_dir / rundir.STATUS_JSON)["timesteps"] == 1024
    with np.load(run_dir / rundir.EVALUATIONS_NPZ) as data:
        assert data["timesteps"].tolist() == [512, 1024]
        assert data["results"].shape == (2, 1)
        assert (data["ep_lengths"] > 0).all()
    rows = (run_dir / rundir.METRICS_CSV).read_text().splitlines()
    assert len(rows) == 1 + 1024 // 256
    assert [step for step, _ in rundir.list_checkpoints(run_dir)] == [512, 1024]
    model = PPO.load(rundir.checkpoint_path(run_dir, 1024), device="cpu")
    assert model.num_timesteps == 1024 and model.n_envs == 2
    assert sorted(p.name for p in (run_dir / "observations").iterdir()) == [
        "obs_1024_0.npy", "obs_1024_1.npy", "obs_512_0.npy", "obs_512_1.npy"]
    assert np.load(run_dir / "observations" / "obs_512_0.npy").shape == (1, 4, 84, 84)
    monitors = sorted(p.name for p in (run_dir / "monitor").iterdir())
    assert "train_0.monitor.csv" in monitors and "train_1.monitor.csv" in monitors
    assert rundir.verify_manifest(run_dir) == []
