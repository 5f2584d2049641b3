"""The fast engine computes SB3 PPO's algorithm: GAE, one update, no host syncs in the loop.

Every test here that runs the engine first makes SB3's own `PPO.train` and `collect_rollouts`
raise, so the engine cannot quietly fall back to them.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import LinearSchedule

from agents.catalog import ATTENTION_TYPES
from agents.extractor import policy_kwargs
from agents.fast.ale_env import SpacesOnlyVecEnv
from agents.fast.engine import FastPPO, compute_gae, policy_outputs

N_ENVS, N_STEPS, BATCH = 2, 64, 32
OBS_SPACE = spaces.Box(0, 255, (4, 84, 84), np.uint8)


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def forbid_sb3_loops(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("the fast engine called SB3's own PPO loop")

    monkeypatch.setattr(PPO, "train", refuse)
    monkeypatch.setattr(PPO, "collect_rollouts", refuse)


def make_model(seed: int = 0, attn: str = "NA") -> PPO:
    model = PPO("CnnPolicy", SpacesOnlyVecEnv(N_ENVS, OBS_SPACE, 4), n_steps=N_STEPS,
                batch_size=BATCH, n_epochs=3, learning_rate=LinearSchedule(2.5e-4, 0.0, 1.0),
                clip_range=LinearSchedule(0.1, 0.0, 1.0), ent_coef=0.01, vf_coef=1.0,
                gamma=0.99, gae_lambda=0.95, max_grad_norm=0.5, policy_kwargs=policy_kwargs(attn),
                seed=seed, device="cpu")
    model.set_logger(configure(None, []))
    return model


def crafted_rollout(model: PPO, seed: int) -> dict[str, np.ndarray]:
    """A rollout with episode ends (a start every ~7 steps) and log-probs off the policy's own
    by a little, so that ratios differ from 1 and clipping happens."""
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, size=(N_STEPS, N_ENVS, 4, 84, 84), dtype=np.uint8)
    actions = rng.integers(0, 4, size=(N_STEPS, N_ENVS))
    with torch.no_grad():
        values, log_probs, _ = model.policy.evaluate_actions(
            torch.as_tensor(obs.reshape(-1, 4, 84, 84)), torch.as_tensor(actions.reshape(-1)))
    return {
        "obs": obs, "actions": actions,
        "rewards": rng.choice([-1.0, 0.0, 0.0, 1.0], size=(N_STEPS, N_ENVS)).astype(np.float32),
        "starts": (rng.random((N_STEPS, N_ENVS)) < 0.15).astype(np.float32),
        "values": values.numpy().reshape(N_STEPS, N_ENVS),
        "log_probs": log_probs.numpy().reshape(N_STEPS, N_ENVS)
        + rng.normal(0, 0.15, (N_STEPS, N_ENVS)).astype(np.float32),
        "last_values": rng.normal(size=N_ENVS).astype(np.float32),
        "last_dones": np.array([1.0, 0.0], dtype=np.float32),
    }


def sb3_buffer(model: PPO, r: dict[str, np.ndarray]) -> RolloutBuffer:
    buffer = model.rollout_buffer
    buffer.reset()
    for t in range(N_STEPS):
        buffer.add(r["obs"][t], r["actions"][t][:, None], r["rewards"][t], r["starts"][t],
                   torch.as_tensor(r["values"][t]), torch.as_tensor(r["log_probs"][t]))
    buffer.compute_returns_and_advantage(torch.as_tensor(r["last_values"]), r["last_dones"])
    return buffer


def env_major(array: np.ndarray) -> torch.Tensor:
    """(n_steps, n_envs, ...) -> SB3's swap_and_flatten order (n_envs * n_steps, ...)."""
    return torch.as_tensor(np.ascontiguousarray(array.swapaxes(0, 1)).reshape(-1,
                                                                              *array.shape[2:]))


def test_gae_and_returns_match_sb3_rollout_buffer() -> None:
    """Crafted episodes: starts mid-column, a start at step 0, a done after the last step, and
    time-limit truncations (SB3 folds gamma * V(terminal obs) into the reward before GAE; so
    does the engine, so the buffer sees the bootstrapped reward in both)."""
    model = make_model()
    r = crafted_rollout(model, seed=1)
    r["starts"][0, :] = 1.0
    truncated = np.zeros_like(r["rewards"], dtype=bool)
    truncated[[9, 30], [0, 1]] = True
    r["rewards"] = r["rewards"] + truncated * 0.99 * np.float32(2.5)  # V(terminal obs) = 2.5
    r["starts"][[10, 31], [0, 1]] = 1.0
    buffer = sb3_buffer(model, r)
    advantages, returns = compute_gae(
        torch.as_tensor(r["rewards"].T), torch.as_tensor(r["values"].T),
        torch.as_tensor(r["starts"].T), torch.as_tensor(r["last_values"]),
        torch.as_tensor(r["last_dones"]), 0.99, 0.95)
    np.testing.assert_allclose(advantages.numpy().T, buffer.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(returns.numpy().T, buffer.returns, rtol=1e-5, atol=1e-5)
    # Not vacuous: ignoring the episode starts changes the advantages.
    wrong, _ = compute_gae(torch.as_tensor(r["rewards"].T), torch.as_tensor(r["values"].T),
                           torch.zeros(N_ENVS, N_STEPS), torch.as_tensor(r["last_values"]),
                           torch.as_tensor(r["last_dones"]), 0.99, 0.95)
    assert not np.allclose(wrong.numpy().T, buffer.advantages, atol=1e-3)


def test_two_updates_match_sb3_ppo_train(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same weights, same rollouts, same minibatch order (the same numpy seed, as both draw one
    np.random.permutation per epoch): parameters, Adam state and logged losses agree."""
    reference = make_model(seed=3)
    fast_model = make_model(seed=4)
    fast_model.policy.load_state_dict(reference.policy.state_dict())
    rollouts = [crafted_rollout(reference, seed=s) for s in (11, 12)]
    progress = [0.7, 0.6]

    logged_ref = []
    for r, p in zip(rollouts, progress, strict=True):
        sb3_buffer(reference, r)
        reference._current_progress_remaining = p
        np.random.seed(123)
        reference.train()
        logged_ref.append(dict(reference.logger.name_to_value))

    forbid_sb3_loops(monkeypatch)
    engine = FastPPO(fast_model, source=None)
    for i, (r, p) in enumerate(zip(rollouts, progress, strict=True)):
        buffer = RolloutBuffer(N_STEPS, OBS_SPACE, spaces.Discrete(4), n_envs=N_ENVS)
        engine_values = env_major(r["values"])
        engine.load_rollout(env_major(r["obs"]), env_major(r["actions"]).long(), engine_values,
                            env_major(r["log_probs"]), torch.zeros(N_ENVS * N_STEPS),
                            torch.zeros(N_ENVS * N_STEPS))
        engine.set_rollout_returns(torch.as_tensor(r["rewards"].T), torch.as_tensor(r["starts"].T),
                                   torch.as_tensor(r["last_values"]),
                                   torch.as_tensor(r["last_dones"]))
        del buffer
        fast_model._current_progress_remaining = p
        np.random.seed(123)
        engine.train()
        logged = fast_model.logger.name_to_value
        for key in ("train/loss", "train/policy_gradient_loss", "train/value_loss",
                    "train/entropy_loss", "train/approx_kl", "train/clip_fraction",
                    "train/explained_variance", "train/clip_range", "train/learning_rate"):
            assert logged[key] == pytest.approx(logged_ref[i][key], rel=1e-4, abs=1e-6), key
        assert logged_ref[i]["train/clip_fraction"] > 0  # the clipped branch was exercised

    for (name, p_ref), p_fast in zip(reference.policy.named_parameters(),
                                     fast_model.policy.parameters(), strict=True):
        torch.testing.assert_close(p_fast, p_ref, rtol=1e-5, atol=1e-6, msg=name)
    ref_state = reference.policy.optimizer.state_dict()["state"]
    fast_state = fast_model.policy.optimizer.state_dict()["state"]
    assert ref_state.keys() == fast_state.keys()
    for key, state in ref_state.items():
        assert float(fast_state[key]["step"]) == float(state["step"]) == 2 * 3 * 4
        torch.testing.assert_close(fast_state[key]["exp_avg_sq"], state["exp_avg_sq"],
                                   rtol=1e-4, atol=1e-10)
    assert fast_model._n_updates == reference._n_updates == 6
    # Not vacuous: another minibatch order gives other parameters.
    other = make_model(seed=5)
    other.policy.load_state_dict(reference.policy.state_dict())
    other_engine = FastPPO(other, source=None)
    other_engine.load_rollout(env_major(rollouts[0]["obs"]),
                              env_major(rollouts[0]["actions"]).long(),
                              env_major(rollouts[0]["values"]), env_major(rollouts[0]["log_probs"]),
                              torch.ones(N_ENVS * N_STEPS), torch.ones(N_ENVS * N_STEPS))
    other._current_progress_remaining = 0.7
    before = copy.deepcopy(other.policy.state_dict())
    other_engine.train()
    assert any(not torch.equal(before[k], v) for k, v in other.policy.state_dict().items())


def updated_engine(model: PPO, monkeypatch: pytest.MonkeyPatch, seed: int) -> FastPPO:
    """An engine on a crafted rollout after one update (so Adam's state is loaded), with SB3's
    own loops made to raise."""
    r = crafted_rollout(model, seed=seed)
    forbid_sb3_loops(monkeypatch)
    engine = FastPPO(model, source=None)
    engine.load_rollout(env_major(r["obs"]), env_major(r["actions"]).long(),
                        env_major(r["values"]), env_major(r["log_probs"]),
                        torch.randn(N_ENVS * N_STEPS), torch.randn(N_ENVS * N_STEPS))
    model._current_progress_remaining = 0.5
    engine.train()
    return engine


def _sync_ops(prof: torch.profiler.profile) -> tuple[int, int, int]:
    """(host syncs inside minibatch ranges, host syncs in all, minibatch ranges)."""
    events = prof.events()
    ranges = [e.time_range for e in events if e.name == "satrl::minibatch"]
    syncs = [e.time_range for e in events
             if e.name in ("aten::item", "aten::_local_scalar_dense")]
    inside = sum(1 for s in syncs if any(r.start <= s.start and s.end <= r.end for r in ranges))
    return inside, len(syncs), len(ranges)


def test_no_host_sync_inside_the_minibatch_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch's profiler sees no aten::item/_local_scalar_dense in any of the update's 12
    minibatches (3 epochs x 128/32), and at most a handful per update (the Adam step counts of
    a loaded optimizer, read once, and the one read-back of the statistics)."""
    model = make_model()
    engine = updated_engine(model, monkeypatch, seed=7)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine.train()
    inside, total, minibatches = _sync_ops(prof)
    assert minibatches == 12
    assert inside == 0
    assert total <= 2


def test_profiler_counts_the_syncs_of_sb3_train() -> None:
    """The counting itself works: SB3's PPO.train does several .item() per minibatch."""
    model = make_model()
    sb3_buffer(model, crafted_rollout(model, seed=8))
    model._current_progress_remaining = 0.5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model.train()
    syncs = sum(1 for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense"))
    assert syncs >= 12 * 4


def _sgd_problem(seed: int) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    grads = [torch.randn(7, 6) for _ in range(9)]
    return net, grads


def _adam_steps(net: torch.nn.Module, optimizer: Any, inputs: list[torch.Tensor],
                step: Any) -> None:
    for x in inputs:
        for p in net.parameters():
            p.grad = None
        net(x).square().mean().backward()
        step()


def test_device_adam_follows_torch_adam_and_resumes_under_it() -> None:
    """DeviceAdam (device step count and lr, capturable) against torch.optim.Adam(eps=1e-5):
    9 steps from a fresh state, then a saved state resumed by both; torch's own step tensors
    advance with it, so the saved optimizer is one torch's Adam continues from."""
    from agents.fast.engine import DeviceAdam

    ref_net, inputs = _sgd_problem(0)
    dev_net = copy.deepcopy(ref_net)
    ref_opt = torch.optim.Adam(ref_net.parameters(), lr=3e-3, eps=1e-5)
    dev_opt = torch.optim.Adam(dev_net.parameters(), lr=3e-3, eps=1e-5)
    adam = DeviceAdam(dev_opt)
    adam.prepare()
    adam.set_lr()
    _adam_steps(ref_net, ref_opt, inputs, ref_opt.step)
    _adam_steps(dev_net, dev_opt, inputs, adam.step)
    adam.count_host_steps(len(inputs))
    for p_dev, p_ref in zip(dev_net.parameters(), ref_net.parameters(), strict=True):
        torch.testing.assert_close(p_dev, p_ref, rtol=1e-6, atol=1e-8)
    assert all(float(s["step"]) == 9 for s in dev_opt.state.values())
    # Resume: torch's Adam from the device-stepped state, and a new DeviceAdam from torch's.
    ref_opt.param_groups[0]["lr"] = dev_opt.param_groups[0]["lr"] = 1e-3
    resumed_torch = torch.optim.Adam(dev_net.parameters(), lr=1e-3, eps=1e-5)
    resumed_torch.load_state_dict(copy.deepcopy(dev_opt.state_dict()))
    twin_net = copy.deepcopy(ref_net)
    twin_opt = torch.optim.Adam(twin_net.parameters(), lr=1e-3, eps=1e-5)
    twin_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # torch shares tensors
    resumed_device = DeviceAdam(twin_opt)
    resumed_device.prepare()
    resumed_device.set_lr()
    assert float(resumed_device.step_count) == 9
    more = inputs[:4]
    _adam_steps(ref_net, ref_opt, more, ref_opt.step)
    _adam_steps(dev_net, resumed_torch, more, resumed_torch.step)
    _adam_steps(twin_net, twin_opt, more, resumed_device.step)
    for p_ref, p_a, p_b in zip(ref_net.parameters(), dev_net.parameters(),
                               twin_net.parameters(), strict=True):
        torch.testing.assert_close(p_a, p_ref, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(p_b, p_ref, rtol=1e-6, atol=1e-8)
    # Not vacuous: without the bias corrections the parameters would be elsewhere.
    plain_net = copy.deepcopy(_sgd_problem(0)[0])
    plain = torch.optim.Adam(plain_net.parameters(), lr=3e-3, eps=1e-5)
    plain_device = DeviceAdam(plain)
    plain_device.prepare()
    plain_device.set_lr()
    plain_device.step_count.fill_(1e6)  # bias corrections ~1
    _adam_steps(plain_net, plain, inputs, plain_device.step)
    ref_again, _ = _sgd_problem(0)
    again = torch.optim.Adam(ref_again.parameters(), lr=3e-3, eps=1e-5)
    _adam_steps(ref_again, again, inputs, again.step)
    assert not torch.allclose(next(plain_net.parameters()), next(ref_again.parameters()),
                              atol=1e-6)


def test_device_adam_refuses_unequal_step_counts() -> None:
    from agents.fast.engine import DeviceAdam

    net, inputs = _sgd_problem(1)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3, eps=1e-5)
    _adam_steps(net, optimizer, inputs[:2], optimizer.step)
    next(iter(optimizer.state.values()))["step"] += 1
    with pytest.raises(ValueError, match="step counts differ"):
        DeviceAdam(optimizer).prepare()


def _all_syncs(prof: torch.profiler.profile) -> int:
    return sum(1 for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense"))


@pytest.mark.parametrize("attn", ATTENTION_TYPES)
def test_graph_bodies_read_nothing_back(monkeypatch: pytest.MonkeyPatch, attn: str) -> None:
    """The bodies that CUDA graphs capture (per step: the policy's action and the recording of
    the transition; per update: every epoch and minibatch and the statistics) contain no
    host sync at all, with every attention type: a capture would fail on one, and eagerly
    each would stall the GPU."""
    model = make_model(attn=attn)
    engine = updated_engine(model, monkeypatch, seed=9)
    engine.staged[:, engine._frame_bytes + 1] = 1  # record every env's transition at row 0
    engine.stack.random_(0, 256)
    stack = engine.stack.clone()
    weights = copy.deepcopy(model.policy.state_dict())
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        engine._act_body()
        engine._advance_body()
        engine._update_body()
    assert _all_syncs(prof) == 0
    # The bodies ran: 12 minibatches, new weights, the stacks recorded and advanced.
    assert sum(1 for e in prof.events() if e.name == "satrl::minibatch") == 12
    assert any(not torch.equal(weights[k], v) for k, v in model.policy.state_dict().items())
    assert torch.equal(engine.obs[0], stack[0]) and torch.equal(engine.obs[N_STEPS], stack[1])
    assert torch.equal(engine.stack[:, :-1], stack[:, 1:])


def test_cuda_graphs_need_a_cuda_device() -> None:
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        FastPPO(make_model(), source=None, cuda_graphs=True)


class EagerGraph:
    """A CUDA graph's stand-in on the CPU: `replay` runs the captured body eagerly."""

    def __init__(self, body: Any) -> None:
        self.body = body
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        self.body()


def test_graph_capture_leaves_weights_optimizer_and_stacks_as_they_were(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA-graph path's own logic, on the CPU with the capture replaced by EagerGraph:
    the warm-up runs before each capture (real updates, real steps) are undone, so two updates
    and three steps of the graph engine equal the eager engine's, bit for bit."""
    forbid_sb3_loops(monkeypatch)
    model, twin = make_model(seed=3), make_model(seed=4)
    twin.policy.load_state_dict(model.policy.state_dict())
    r = crafted_rollout(model, seed=5)
    eager, graphs = FastPPO(model, source=None), FastPPO(twin, source=None)
    graphs.cuda_graphs = True  # what a CUDA device allows; the capture is the stand-in's
    monkeypatch.setattr(graphs, "_record", EagerGraph)
    advantages, returns = torch.randn(N_ENVS * N_STEPS), torch.randn(N_ENVS * N_STEPS)
    for engine in (eager, graphs):
        engine.load_rollout(env_major(r["obs"]), env_major(r["actions"]).long(),
                            env_major(r["values"]), env_major(r["log_probs"]), advantages,
                            returns)
        engine.model._current_progress_remaining = 0.6
        for seed in (1, 2):
            np.random.seed(seed)
            engine.train()
    for p_eager, p_graph in zip(model.policy.parameters(), twin.policy.parameters(), strict=True):
        assert torch.equal(p_eager, p_graph)
    for s_eager, s_graph in zip(model.policy.optimizer.state.values(),
                                twin.policy.optimizer.state.values(), strict=True):
        assert float(s_eager["step"]) == float(s_graph["step"]) == 2 * 3 * 4
        assert torch.equal(s_eager["exp_avg_sq"], s_graph["exp_avg_sq"])
    assert graphs._graphs["update"].replays == 2

    rng = np.random.default_rng(6)
    start = torch.from_numpy(rng.integers(0, 256, tuple(eager.stack.shape), dtype=np.uint8))
    fb = eager._frame_bytes
    for step in range(3):
        staged = torch.from_numpy(rng.integers(0, 256, tuple(eager.staged.shape), np.uint8))
        staged[:, fb:] = 0
        staged[:, fb + 1] = 1  # record, at position `step`, one env's column freshly started
        staged[:, fb + 2] = step
        staged[0, fb] = 1
        staged[1, fb + 5] = int(step == 2)
        eager._act_body()
        for engine in (eager, graphs):
            if step == 0:
                engine.stack.copy_(start)
            engine.staged.copy_(staged)
            for key in ("step_actions", "step_values", "step_log_probs"):
                getattr(engine, key).copy_(getattr(eager, key))
            engine._advance(bootstrap=False)
        for key in ("stack", "last_stack", "obs", "actions", "values", "log_probs"):
            assert torch.equal(getattr(eager, key)[: eager.size],
                               getattr(graphs, key)[: eager.size]), (step, key)
    assert graphs._graphs["advance"].replays == 3
    assert not torch.equal(graphs.stack, start)  # not vacuous: the stacks did advance
    graphs._act()
    log_probs, values = policy_outputs(twin.policy, graphs.stack)
    assert torch.allclose(graphs.step_values, values)
    assert torch.allclose(graphs.step_log_probs,
                          log_probs.gather(1, graphs.step_actions[:, None]).squeeze(1))
    assert graphs._graphs["act"].replays == 1
