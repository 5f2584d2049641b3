"""FastPPO: SB3 PPO's rollout and update on SB3's own policy, with everything on the device.

The algorithm is SB3 2.x `PPO.collect_rollouts` + `RolloutBuffer` + `PPO.train`, line for line:
GAE(lambda) with SB3's episode-start convention, per-minibatch advantage normalisation (std with
Bessel's correction, + 1e-8), the clipped surrogate, the value loss as MSE against the returns
(no value clipping: clip_range_vf is None), the entropy bonus, gradient-norm clipping, the lr and
clip schedules evaluated at `_current_progress_remaining`, and Adam (eps from the optimizer's own
param group) — applied with foreach updates whose bias corrections come from device scalars,
so results agree with torch.optim.Adam to float rounding.
The minibatch order comes from `np.random.permutation` once per epoch, as SB3's buffer draws it,
so the same numpy RNG state gives SB3's exact order. The policy object, its optimizer and the
step counters are the PPO model's own: `model.save` writes the usual SB3 zip.

What is different is where the work happens:
- the observations (frame stacks), the rollout buffer and GAE live on the device; per step one
  host-to-device copy (the new frames plus a few flag bytes, from pinned memory) and one
  device-to-host copy (the sampled actions) — the step's only synchronisation; the games are
  stepped with ale-py's send/recv, and the host bookkeeping that needs no outcome runs while
  they emulate;
- actions are sampled with the Gumbel-max trick and log-probabilities/entropies computed from
  log-softmax directly, without torch.distributions' argument validation (a host sync);
- the update keeps losses and statistics on the device and reads them once, after the last
  minibatch; Adam's step count and learning rate are device scalars, so nothing in a
  minibatch reads a value back;
- with the spec's `cuda_graphs`, the per-step work and the whole update are captured once as
  CUDA graphs and replayed (see FastPPO).

The engine drives the worker's SB3 callbacks through their public hooks (on_training_start,
on_rollout_start, on_step, on_rollout_end, on_training_end) with `model.num_timesteps` advanced
by n_envs per vector step, so evaluations, checkpoints, dumps, metrics and status follow the same
schedule as the reference path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from torch.nn import functional as F

if TYPE_CHECKING:
    from stable_baselines3 import PPO

    from agents.fast.ale_env import AtariVectorSource

#: Flag bytes appended to each env's frame in the per-step staging buffer.
_FRESH, _RECORD, _POS_LO, _POS_HI, _BOOT, _FILLED = range(6)
_N_FLAGS = 6
#: The update's statistics, in the order of `FastPPO._stats` (the first six are logged as is).
_STATS = ("entropy_loss", "policy_gradient_loss", "value_loss", "approx_kl", "clip_fraction",
          "loss", "explained_variance", "returns_variance")
#: Eager runs of a body before its CUDA graph is captured (torch's recipe: warm up on a side
#: stream, so that lazy initialisation and cuDNN's autotuning are not captured).
_WARMUP_RUNS = 3


def policy_outputs(policy: Any, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities of every action (n, A), values (n,)) of SB3's ActorCriticPolicy.

    The same modules and the same preprocessing (uint8 / 255) as `evaluate_actions`; the
    log-softmax is what torch's Categorical(logits=...) normalises its logits to.
    """
    features = policy.extract_features(obs)
    latent_pi, latent_vf = policy.mlp_extractor(features)
    logits = policy.action_net(latent_pi)
    values = policy.value_net(latent_vf).flatten()
    return logits - logits.logsumexp(-1, keepdim=True), values


def entropy_of(log_probs: torch.Tensor) -> torch.Tensor:
    """Categorical entropy exactly as torch computes it (logits clamped to the dtype's min)."""
    clamped = log_probs.clamp(min=torch.finfo(log_probs.dtype).min)
    return -(clamped * log_probs.exp()).sum(-1)


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, episode_starts: torch.Tensor,
                last_values: torch.Tensor, last_dones: torch.Tensor, gamma: float,
                gae_lambda: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SB3 RolloutBuffer.compute_returns_and_advantage on (n_envs, n_steps) tensors.

    episode_starts[e, t] says obs t of env e began an episode; last_dones[e] says the obs after
    the column's last transition does. Returns (advantages, returns), both (n_envs, n_steps).
    """
    n_steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last_gae = torch.zeros_like(last_values)
    for step in reversed(range(n_steps)):
        if step == n_steps - 1:
            next_non_terminal = 1.0 - last_dones
            next_values = last_values
        else:
            next_non_terminal = 1.0 - episode_starts[:, step + 1]
            next_values = values[:, step + 1]
        delta = rewards[:, step] + gamma * next_values * next_non_terminal - values[:, step]
        last_gae = delta + gamma * gae_lambda * next_non_terminal * last_gae
        advantages[:, step] = last_gae
    return advantages, advantages + values


class DeviceAdam:
    """torch.optim.Adam's update on the optimizer's own state, with no host sync: capturable.

    torch's non-capturable Adam reads its step count (a CPU tensor) for the bias corrections;
    here one device step counter and a device learning rate feed them, as torch's
    `capturable=True` Adam does, so the whole update can be captured in a CUDA graph. torch's
    own per-parameter step tensors are advanced on the host after each update
    (`count_host_steps`), so a saved optimizer resumes identically under torch's Adam.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if len(optimizer.param_groups) != 1:
            raise ValueError("FastPPO expects SB3's single Adam param group")
        group = optimizer.param_groups[0]
        for key, expected in (("weight_decay", 0), ("amsgrad", False), ("maximize", False)):
            if group.get(key, expected) != expected:
                raise ValueError(f"FastPPO's Adam does not implement {key}={group[key]!r}")
        self.optimizer = optimizer
        self.group = group
        self.params: list[torch.Tensor] = list(group["params"])
        device = self.params[0].device
        # float64, as the Python floats torch's own Adam computes its bias corrections in:
        # in float32, 1 - 0.999**t loses five digits (0.999 is not a float32).
        self.step_count = torch.zeros((), dtype=torch.float64, device=device)
        self.lr = torch.zeros((), dtype=torch.float64, device=device)
        self.exp_avgs: list[torch.Tensor] = []
        self.exp_avg_sqs: list[torch.Tensor] = []

    def prepare(self) -> None:
        """Create (as torch does lazily) or read the optimizer state, once, before any update.

        Every parameter steps at every update (SB3's policy has no unused parameter), so one
        step count serves them all; a state where they differ is refused.
        """
        if self.exp_avgs:
            return
        counts = set()
        for p in self.params:
            state = self.optimizer.state[p]
            if not state:  # exactly torch's lazy initialisation (non-capturable, non-fused)
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            counts.add(float(state["step"]))  # a CPU tensor: no device sync
        if len(counts) != 1:
            raise ValueError(f"Adam's step counts differ between parameters: {sorted(counts)}")
        self.step_count.fill_(counts.pop())
        self.exp_avgs = [self.optimizer.state[p]["exp_avg"] for p in self.params]
        self.exp_avg_sqs = [self.optimizer.state[p]["exp_avg_sq"] for p in self.params]

    def set_lr(self) -> None:
        """Take the param group's learning rate (SB3's schedule sets it) onto the device."""
        self.lr.fill_(float(self.group["lr"]))

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step of every parameter from its .grad (graph-ready: device scalars only)."""
        beta1, beta2 = self.group["betas"]
        eps = float(self.group["eps"])
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise ValueError("a policy parameter got no gradient: FastPPO steps them all")
        self.step_count += 1
        bias_correction1 = 1 - beta1 ** self.step_count
        bias_correction2_sqrt = (1 - beta2 ** self.step_count).sqrt()
        torch._foreach_lerp_(self.exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(self.exp_avg_sqs, beta2)
        torch._foreach_addcmul_(self.exp_avg_sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(self.exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt.float())
        torch._foreach_add_(denom, eps)
        # p += step_size * m / denom, step_size = -lr / bias_correction1, as torch's addcdiv_
        # with value=step_size (whose value is a host float there, a device scalar here).
        torch._foreach_div_(denom, (-self.lr / bias_correction1).float())
        torch._foreach_addcdiv_(self.params, self.exp_avgs, denom)

    def count_host_steps(self, steps: int) -> None:
        """Advance torch's own CPU step tensors by the steps an update took on the device."""
        torch._foreach_add_([self.optimizer.state[p]["step"] for p in self.params], steps)


class _LazyStack:
    """The frame stacks as the callbacks' `new_obs`, copied to the host only when read."""

    def __init__(self, stack: torch.Tensor) -> None:
        self.stack = stack

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.stack.cpu().numpy()
        return array if dtype is None else array.astype(dtype)


class FastPPO:
    """Collects rollouts from an AtariVectorSource and updates `model.policy` like PPO.train.

    Every per-step and per-update computation on the device is a *body* that works in place on
    fixed buffers and never reads a value back to the host (`_act_body`, `_advance_body`,
    `_update_body`). Eagerly they are the engine; on CUDA with `cuda_graphs` each is captured
    once in a CUDA graph and replayed: a vector step is two graph launches and an update one,
    where eagerly every kernel is launched from Python.

    :param model: an SB3 PPO whose env is the source's stand-in (`source.stand_in()`).
    :param source: the training games; None for update-only use (tests, benchmarks).
    :param cuda_graphs: replay the bodies as CUDA graphs (the spec's `cuda_graphs`; CUDA only).
    """

    def __init__(self, model: PPO, source: AtariVectorSource | None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.policy = model.policy
        self.device = model.device
        self.source = source
        self.n_envs, self.n_steps = model.n_envs, model.n_steps
        if self.n_steps > 0xFFFF:  # positions travel as two bytes of the staging buffer
            raise ValueError(f"FastPPO supports n_steps up to 65535, got {self.n_steps}")
        if model.clip_range_vf is not None or model.target_kl is not None:
            raise ValueError("FastPPO implements clip_range_vf=None and target_kl=None only")
        self.size = self.n_envs * self.n_steps
        obs_shape = model.observation_space.shape
        assert obs_shape is not None
        self.obs_shape = tuple(obs_shape)
        dev = self.device
        if cuda_graphs and dev.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; this model is on {dev}")
        self.cuda_graphs = cuda_graphs
        if dev.type == "cuda":
            # Fixed batch shapes (n_envs in the rollout, batch_size in the update): let cuDNN
            # pick its fastest convolution algorithms once (float32 arithmetic unchanged).
            torch.backends.cudnn.benchmark = True
        # Flat buffers in SB3's swap_and_flatten order (env-major), + 1 trash row for writes of
        # envs that record nothing this step (a fixed-size scatter needs no host-side filtering).
        rows = self.size + 1
        self.obs = torch.zeros((rows, *self.obs_shape), dtype=torch.uint8, device=dev)
        self.actions = torch.zeros(rows, dtype=torch.long, device=dev)
        self.values = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.log_probs = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.bootstrap = torch.zeros(rows, dtype=torch.float32, device=dev)
        self.advantages = torch.zeros(self.size, dtype=torch.float32, device=dev)
        self.returns = torch.zeros(self.size, dtype=torch.float32, device=dev)
        # Host-side per-transition data, copied to the device once per rollout.
        self.rewards_host = np.zeros((self.n_envs, self.n_steps), dtype=np.float32)
        self.starts_host = np.zeros((self.n_envs, self.n_steps), dtype=np.float32)
        self.last_dones_host = np.zeros(self.n_envs, dtype=np.float32)
        # The per-step state, updated in place: the frame stacks, the stacks that follow each
        # full column (for the last values), the policy's outputs on the current stacks.
        self.stack = torch.zeros((self.n_envs, *self.obs_shape), dtype=torch.uint8, device=dev)
        self.last_stack = torch.zeros_like(self.stack)
        self.step_actions = torch.zeros(self.n_envs, dtype=torch.long, device=dev)
        self.step_values = torch.zeros(self.n_envs, dtype=torch.float32, device=dev)
        self.step_log_probs = torch.zeros(self.n_envs, dtype=torch.float32, device=dev)
        side = self.obs_shape[-1] * self.obs_shape[-2]
        self._frame_bytes = side
        pin = dev.type == "cuda"
        # Per step, frames + flag bytes go host -> device in one copy, from pinned memory.
        self._staging = torch.zeros((self.n_envs, side + _N_FLAGS), dtype=torch.uint8,
                                    pin_memory=pin)
        self.staged = torch.zeros_like(self._staging, device=dev)
        self._actions_host = torch.zeros(self.n_envs, dtype=torch.long, pin_memory=pin)
        self._env_rows = torch.arange(self.n_envs, device=dev) * self.n_steps
        self._episode_start = np.ones(self.n_envs, dtype=bool)  # of each env's next learner obs
        # The update's inputs and outputs on the device: minibatch order, clip range, statistics.
        self.adam = DeviceAdam(self.policy.optimizer)
        self._order = torch.zeros((model.n_epochs, self.size), dtype=torch.long, device=dev)
        self._clip_range = torch.zeros((), dtype=torch.float32, device=dev)
        self._stats = torch.zeros(len(_STATS), dtype=torch.float32, device=dev)
        self._graphs: dict[str, Any] = {}  # body name -> torch.cuda.CUDAGraph
        self.timings: list[tuple[float, float]] = []  # (rollout s, update s) per iteration
        # Vector steps per finished rollout: n_steps, plus the steps that envs whose column was
        # full took while others caught up on hidden reset steps (emulated, not learned from).
        self.rollout_vector_steps: list[int] = []
        self.episode_scores: list[float] = []
        self._started = False

    # --- rollout ---------------------------------------------------------------------------
    def start(self, seed: int) -> None:
        """Reset the games; the frame stacks begin as zeros + the first frame."""
        assert self.source is not None
        frames = torch.from_numpy(self.source.reset(seed))
        self.stack.zero_()
        self.stack[:, -1] = frames.to(self.device)
        self._episode_start[:] = True
        self._started = True

    @torch.no_grad()
    def _act_body(self) -> None:
        """The policy on the current stacks: sampled actions, values, their log-probabilities."""
        log_probs, values = policy_outputs(self.policy, self.stack)
        # Gumbel-max: argmax(log p - log E), E ~ Exp(1), samples the categorical, no host sync.
        noise = torch.empty_like(log_probs).exponential_()
        actions = (log_probs - noise.log()).argmax(-1)
        self.step_actions.copy_(actions)
        self.step_values.copy_(values)
        self.step_log_probs.copy_(log_probs.gather(1, actions[:, None]).squeeze(1))

    @torch.no_grad()
    def _advance_body(self, bootstrap: bool = False) -> None:
        """Record this step's transitions from `staged` (frames + flags) and advance the stacks.

        With `bootstrap` (a time-limit truncation this step; rare, never captured) the flagged
        transitions' rewards get gamma * V(terminal stack).
        """
        staged, fb = self.staged, self._frame_bytes
        flags = staged[:, fb:].long()
        frames = staged[:, :fb].view(self.n_envs, 1, *self.obs_shape[1:])
        rows = torch.where(flags[:, _RECORD].bool(),
                           self._env_rows + flags[:, _POS_LO] + 256 * flags[:, _POS_HI],
                           self.size)
        self.obs.index_copy_(0, rows, self.stack)
        self.actions.index_copy_(0, rows, self.step_actions)
        self.values.index_copy_(0, rows, self.step_values)
        self.log_probs.index_copy_(0, rows, self.step_log_probs)
        new_stack = torch.cat((self.stack[:, 1:], frames), dim=1)
        if bootstrap:  # time-limit truncation: r += gamma * V(terminal observation)
            _, terminal_values = policy_outputs(self.policy, new_stack)
            gamma = float(self.model.gamma)
            self.bootstrap.index_add_(0, rows, gamma * terminal_values * flags[:, _BOOT])
        keep = (1 - flags[:, _FRESH]).to(torch.uint8).view(-1, 1, 1, 1)
        new_stack[:, :-1] *= keep
        filled = flags[:, _FILLED].bool().view(-1, 1, 1, 1)
        self.last_stack.copy_(torch.where(filled, new_stack, self.last_stack))
        self.stack.copy_(new_stack)

    def _run(self, name: str, body: Callable[[], None], keep: list[torch.Tensor]) -> None:
        """Run a body: eagerly, or by replaying its CUDA graph (captured on first use)."""
        if self.cuda_graphs:
            self._graph(name, body, keep).replay()
        else:
            body()

    def _graph(self, name: str, body: Callable[[], None], keep: list[torch.Tensor]) -> Any:
        """The CUDA graph of `body`, captured on first use after torch's recipe: warm-up runs
        (on a side stream), then the capture.

        The warm-up runs execute the body for real; `keep` lists the tensors they change that
        must not change (weights, optimizer state, frame stacks): they are put back. A capture
        changes nothing (its kernels are recorded, not run).
        """
        graph = self._graphs.get(name)
        if graph is None:
            saved = [t.clone() for t in keep]
            self._warm_up(body)
            with torch.no_grad():
                for tensor, value in zip(keep, saved, strict=True):
                    tensor.copy_(value)
            graph = self._graphs[name] = self._record(body)
        return graph

    def _warm_up(self, body: Callable[[], None]) -> None:
        if self.device.type != "cuda":  # eager-only stand-ins of graphs, in tests
            for _ in range(_WARMUP_RUNS):
                body()
            return
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(_WARMUP_RUNS):
                body()
        current.wait_stream(side)

    def _record(self, body: Callable[[], None]) -> Any:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body()
        return graph

    def _act(self) -> None:
        self._run("act", self._act_body, keep=[])

    def _advance(self, bootstrap: bool) -> None:
        if bootstrap or not self.cuda_graphs:
            self._advance_body(bootstrap)
            return
        keep = [self.stack, self.last_stack]
        if "advance" not in self._graphs:
            # Warm-up runs must record nothing (flags zero: every row is the trash row); the
            # stacks they advance are put back, and so are the real flags before the replay.
            staged = self.staged.clone()
            self.staged.zero_()
            self._graph("advance", self._advance_body, keep)
            self.staged.copy_(staged)
        self._run("advance", self._advance_body, keep)

    def collect_rollout(self, callback: BaseCallback) -> bool:
        """One rollout of n_steps learner transitions per env; False if a callback stops it."""
        assert self.source is not None and self._started
        model, source, n_envs, n_steps = self.model, self.source, self.n_envs, self.n_steps
        self.policy.set_training_mode(False)
        callback.on_rollout_start()
        start_steps = model.num_timesteps
        pos = np.zeros(n_envs, dtype=np.int64)
        self.bootstrap.zero_()
        staging = self._staging.numpy()
        fb = self._frame_bytes
        cuda = self.device.type == "cuda"
        vector_steps = 0
        while (pos < n_steps).any():
            self._act()
            self._actions_host.copy_(self.step_actions, non_blocking=True)
            if cuda:
                torch.cuda.current_stream(self.device).synchronize()  # the step's one sync
            send, visible = source.actions_to_send(self._actions_host.numpy())
            source.send(send)
            # While the games run: this step's bookkeeping that needs no outcome.
            record = visible & (pos < n_steps)
            envs = np.flatnonzero(record)
            at = pos[envs]
            self.starts_host[envs, at] = self._episode_start[envs]
            filled = record & (pos == n_steps - 1)
            staging[:, fb + _RECORD] = record
            staging[:, fb + _POS_LO] = pos & 0xFF
            staging[:, fb + _POS_HI] = pos >> 8
            staging[:, fb + _FILLED] = filled
            pos[envs] += 1
            vector_steps += 1
            outcome = source.receive()
            self.rewards_host[envs, at] = outcome.reward[envs]
            # The next learner obs starts an episode iff this transition ended one (hidden steps
            # leave the flag set; steps past a full column keep it current for the next rollout).
            self._episode_start[visible] = outcome.done[visible]
            self.last_dones_host[filled] = outcome.done[filled]
            bootstrap = outcome.bootstrap & record
            staging[:, :fb] = outcome.frames.reshape(n_envs, fb)
            staging[:, fb + _FRESH] = outcome.fresh
            staging[:, fb + _BOOT] = bootstrap
            self.staged.copy_(self._staging, non_blocking=True)
            self._advance(bootstrap=bool(bootstrap.any()))
            for _env, score, frames in outcome.episodes:
                self.episode_scores.append(score)
                if model.ep_info_buffer is not None:
                    model.ep_info_buffer.extend([{"r": score, "l": frames}])
            model.num_timesteps = start_steps + min(vector_steps * n_envs, self.size)
            callback.update_locals({"new_obs": _LazyStack(self.stack)})
            if not callback.on_step():
                return False
        self.rollout_vector_steps.append(vector_steps)
        self._finish_rollout()
        callback.on_rollout_end()
        return True

    @torch.no_grad()
    def _finish_rollout(self) -> None:
        _, last_values = policy_outputs(self.policy, self.last_stack)
        dev = self.device
        rewards = torch.from_numpy(self.rewards_host).to(dev) + \
            self.bootstrap[: self.size].view(self.n_envs, self.n_steps)
        starts = torch.from_numpy(self.starts_host).to(dev)
        last_dones = torch.from_numpy(self.last_dones_host).to(dev)
        self.set_rollout_returns(rewards, starts, last_values, last_dones)

    def set_rollout_returns(self, rewards: torch.Tensor, episode_starts: torch.Tensor,
                            last_values: torch.Tensor, last_dones: torch.Tensor) -> None:
        """GAE over the buffer's values: fills advantages and returns (flat, env-major)."""
        values = self.values[: self.size].view(self.n_envs, self.n_steps)
        advantages, returns = compute_gae(rewards, values, episode_starts, last_values,
                                          last_dones, float(self.model.gamma),
                                          float(self.model.gae_lambda))
        self.advantages.copy_(advantages.flatten())
        self.returns.copy_(returns.flatten())

    def load_rollout(self, obs: torch.Tensor, actions: torch.Tensor, values: torch.Tensor,
                     log_probs: torch.Tensor, advantages: torch.Tensor,
                     returns: torch.Tensor) -> None:
        """Put a rollout in the buffer directly (flat, env-major, as SB3's get() sees it)."""
        n = self.size
        self.obs[:n].copy_(obs)
        self.actions[:n].copy_(actions)
        self.values[:n].copy_(values)
        self.log_probs[:n].copy_(log_probs)
        self.advantages.copy_(advantages)
        self.returns.copy_(returns)

    # --- update ----------------------------------------------------------------------------
    def _update_body(self) -> None:
        """PPO.train's epochs and minibatches over the buffer, in place, with no host sync.

        Inputs on the device: the buffer, `_order` (one permutation per epoch), `_clip_range`
        and Adam's learning rate; outputs: the policy's weights, Adam's state and `_stats`.
        """
        model, policy = self.model, self.policy
        n, batch = self.size, int(model.batch_size)
        clip_range = self._clip_range
        obs, actions = self.obs[:n], self.actions[:n]
        old_log_probs, advantages_all, returns = self.log_probs[:n], self.advantages, self.returns
        pg_losses, value_losses, entropy_losses, clip_fractions = [], [], [], []
        approx_kls: list[torch.Tensor] = []
        loss = torch.zeros((), device=self.device)
        parameters = self.adam.params
        for epoch in range(model.n_epochs):
            approx_kls = []
            for start in range(0, n, batch):
                with torch.profiler.record_function("satrl::minibatch"):
                    idx = self._order[epoch, start:start + batch]
                    all_log_probs, values = policy_outputs(policy, obs.index_select(0, idx))
                    b_actions = actions.index_select(0, idx)
                    log_prob = all_log_probs.gather(1, b_actions[:, None]).squeeze(1)
                    entropy = entropy_of(all_log_probs)
                    advantages = advantages_all.index_select(0, idx)
                    size = min(batch, n - start)
                    if model.normalize_advantage and size > 1:
                        # std with Bessel's correction, as Tensor.std, whose CPU kernel reads
                        # a scalar back (aten::item) where this does not.
                        centered = advantages - advantages.mean()
                        std = (centered.square().sum() / (size - 1)).sqrt()
                        advantages = centered / (std + 1e-8)
                    b_old = old_log_probs.index_select(0, idx)
                    ratio = torch.exp(log_prob - b_old)
                    policy_loss = -torch.min(
                        advantages * ratio,
                        advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range),
                    ).mean()
                    value_loss = F.mse_loss(returns.index_select(0, idx), values)
                    entropy_loss = -torch.mean(entropy)
                    loss = policy_loss + model.ent_coef * entropy_loss + model.vf_coef * value_loss
                    with torch.no_grad():
                        log_ratio = log_prob - b_old
                        approx_kls.append(torch.mean((torch.exp(log_ratio) - 1) - log_ratio))
                        clip_fractions.append(torch.mean((torch.abs(ratio - 1) > clip_range)
                                                         .float()))
                    pg_losses.append(policy_loss.detach())
                    value_losses.append(value_loss.detach())
                    entropy_losses.append(entropy_loss.detach())
                    for p in parameters:  # SB3's optimizer.zero_grad() (set_to_none)
                        p.grad = None
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, model.max_grad_norm)
                    self.adam.step()
        with torch.no_grad():
            flat_values, flat_returns = self.values[:n], self.returns
            var_y = (flat_returns - flat_returns.mean()).square().mean()
            residual = flat_returns - flat_values
            explained = 1 - (residual - residual.mean()).square().mean() / var_y
            self._stats.copy_(torch.stack([
                torch.stack(entropy_losses).mean(), torch.stack(pg_losses).mean(),
                torch.stack(value_losses).mean(), torch.stack(approx_kls).mean(),
                torch.stack(clip_fractions).mean(), loss.detach(), explained, var_y,
            ]))

    def train(self, permutation: Callable[[int], np.ndarray] = np.random.permutation) -> None:
        """One PPO update over the buffer: SB3's PPO.train without its per-minibatch syncs."""
        model, policy = self.model, self.policy
        policy.set_training_mode(True)
        model._update_learning_rate(policy.optimizer)
        clip_range = float(model.clip_range(model._current_progress_remaining))
        n, batch = self.size, int(model.batch_size)
        # One permutation per epoch, drawn as SB3's RolloutBuffer.get draws them.
        order = np.stack([permutation(n) for _ in range(model.n_epochs)])
        self._order.copy_(torch.from_numpy(order))
        self._clip_range.fill_(clip_range)
        self.adam.prepare()
        self.adam.set_lr()
        keep = [*self.adam.params, *self.adam.exp_avgs, *self.adam.exp_avg_sqs,
                self.adam.step_count]
        self._run("update", self._update_body, keep=keep)
        minibatches = -(-n // batch)
        self.adam.count_host_steps(model.n_epochs * minibatches)
        model._n_updates += model.n_epochs
        stats = self._stats.double().cpu().numpy()  # every statistic in one read-back
        record = model.logger.record
        for name, value in zip(_STATS[:6], stats[:6], strict=True):
            record(f"train/{name}", float(value))
        record("train/explained_variance", float(stats[6]) if stats[7] != 0 else math.nan)
        record("train/n_updates", model._n_updates, exclude="tensorboard")
        record("train/clip_range", clip_range)

    # --- the learn loop --------------------------------------------------------------------
    def learn(self, total_timesteps: int, callback: Any = None, log_interval: int = 1,
              tb_log_name: str = "PPO", reset_num_timesteps: bool = False,
              seed: int | None = None) -> PPO:
        """SB3's OnPolicyAlgorithm.learn with this engine's rollout and update."""
        model = self.model
        total, callback = model._setup_learn(total_timesteps, callback, reset_num_timesteps,
                                             tb_log_name, progress_bar=False)
        if not self._started:
            self.start(model.seed if seed is None else seed)
        callback.on_training_start(locals(), globals())
        iteration = 0
        while model.num_timesteps < total:
            t0 = time.perf_counter()
            if not self.collect_rollout(callback):
                break
            t1 = time.perf_counter()
            iteration += 1
            model._update_current_progress_remaining(model.num_timesteps, total)
            if log_interval and iteration % log_interval == 0:
                model.dump_logs(iteration)
            self.train()
            self.timings.append((t1 - t0, time.perf_counter() - t1))
        callback.on_training_end()
        return model
