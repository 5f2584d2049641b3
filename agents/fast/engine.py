"""FastPPO: SB3 PPO's rollout and update on SB3's own policy, with everything on the device.

The algorithm is SB3 2.x `PPO.collect_rollouts` + `RolloutBuffer` + `PPO.train`, line for line:
GAE(lambda) with SB3's episode-start convention, per-minibatch advantage normalisation (std with
Bessel's correction, + 1e-8), the clipped surrogate, the value loss as MSE against the returns
(no value clipping: clip_range_vf is None), the entropy bonus, gradient-norm clipping, the lr and
clip schedules evaluated at `_current_progress_remaining`, and Adam (eps from the optimizer's own
param group) — applied with torch's own foreach update, so results agree with torch.optim.Adam.
The minibatch order comes from `np.random.permutation` once per epoch, as SB3's buffer draws it,
so the same numpy RNG state gives SB3's exact order. The policy object, its optimizer and the
step counters are the PPO model's own: `model.save` writes the usual SB3 zip.

What is different is where the work happens:
- the observations (frame stacks), the rollout buffer and GAE live on the device; per step one
  host-to-device copy (the new frames plus a few flag bytes, from pinned memory) and one
  device-to-host copy (the sampled actions) — the step's only synchronisation;
- actions are sampled with the Gumbel-max trick and log-probabilities/entropies computed from
  log-softmax directly, without torch.distributions' argument validation (a host sync);
- the update keeps losses and statistics on the device and reads them once, after the last
  minibatch; Adam's bias corrections use a host-side step count instead of `.item()`.

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
    """torch.optim.Adam's foreach update on the optimizer's own state, without `.item()`.

    torch keeps Adam's step count as a CPU tensor and reads it with `.item()` for the bias
    corrections; here a host integer mirrors it (the tensor is still incremented, so a saved
    optimizer resumes identically under torch's own Adam).
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
        self._steps: dict[int, int] = {}

    def prepare(self) -> None:
        """Read the step counts of a loaded optimizer once, before any minibatch loop."""
        for p in self.group["params"]:
            state = self.optimizer.state.get(p)
            if state and id(p) not in self._steps:
                self._steps[id(p)] = int(state["step"].item())  # a CPU tensor: no device sync

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.optimizer.state[p]
        if not state:  # exactly torch's lazy initialisation (non-capturable, non-fused)
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self._steps[id(p)] = 0
        elif id(p) not in self._steps:  # prepare() was not called
            self._steps[id(p)] = int(state["step"].item())
        return state

    @torch.no_grad()
    def step(self) -> None:
        group = self.group
        beta1, beta2 = group["betas"]
        lr, eps = float(group["lr"]), float(group["eps"])
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self._state(p) for p in params]
        grads = [p.grad for p in params]
        exp_avgs = [s["exp_avg"] for s in states]
        exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        torch._foreach_add_([s["step"] for s in states], 1)
        for p in params:
            self._steps[id(p)] += 1
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
        counts = [self._steps[id(p)] for p in params]
        step_size = [(lr / (1 - beta1 ** n)) * -1 for n in counts]
        bias_correction2_sqrt = [(1 - beta2 ** n) ** 0.5 for n in counts]
        denom = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denom, bias_correction2_sqrt)
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


class _LazyStack:
    """The frame stacks as the callbacks' `new_obs`, copied to the host only when read."""

    def __init__(self, stack: torch.Tensor) -> None:
        self.stack = stack

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        array = self.stack.cpu().numpy()
        return array if dtype is None else array.astype(dtype)


class FastPPO:
    """Collects rollouts from an AtariVectorSource and updates `model.policy` like PPO.train.

    :param model: an SB3 PPO whose env is the source's stand-in (`source.stand_in()`).
    :param source: the training games; None for update-only use (tests, benchmarks).
    """

    def __init__(self, model: PPO, source: AtariVectorSource | None) -> None:
        self.model = model
        self.policy = model.policy
        self.device = model.device
        self.source = source
        self.n_envs, self.n_steps = model.n_envs, model.n_steps
        if self.n_steps > 0xFFFF:  # positions travel as two bytes of the staging buffer
            raise ValueError(f"FastPPO supports n_steps up to 65535, got {self.n_steps}")
        self.size = self.n_envs * self.n_steps
        obs_shape = model.observation_space.shape
        assert obs_shape is not None
        self.obs_shape = tuple(obs_shape)
        dev = self.device
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
        self.stack = torch.zeros((self.n_envs, *self.obs_shape), dtype=torch.uint8, device=dev)
        self.last_stack = torch.zeros_like(self.stack)
        side = self.obs_shape[-1] * self.obs_shape[-2]
        self._frame_bytes = side
        pin = dev.type == "cuda"
        self._staging = torch.zeros((self.n_envs, side + _N_FLAGS), dtype=torch.uint8,
                                    pin_memory=pin)
        self._actions_host = torch.zeros(self.n_envs, dtype=torch.long, pin_memory=pin)
        self._env_rows = torch.arange(self.n_envs, device=dev) * self.n_steps
        self._episode_start = np.ones(self.n_envs, dtype=bool)  # of each env's next learner obs
        self.adam = DeviceAdam(self.policy.optimizer)
        self.timings: list[tuple[float, float]] = []  # (rollout s, update s) per iteration
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
    def _act(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs, values = policy_outputs(self.policy, self.stack)
        # Gumbel-max: argmax(log p - log E), E ~ Exp(1), samples the categorical, no host sync.
        noise = torch.empty_like(log_probs).exponential_()
        actions = (log_probs - noise.log()).argmax(-1)
        return actions, values, log_probs.gather(1, actions[:, None]).squeeze(1)

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
        frame_bytes = self._frame_bytes
        gamma = float(model.gamma)
        vector_steps = 0
        while (pos < n_steps).any():
            actions, values, log_probs = self._act()
            self._actions_host.copy_(actions, non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the step's one sync
            send, visible = source.actions_to_send(self._actions_host.numpy())
            record = visible & (pos < n_steps)
            outcome = source.step(send)
            # Host bookkeeping of the recorded transitions.
            envs = np.flatnonzero(record)
            at = pos[envs]
            self.rewards_host[envs, at] = outcome.reward[envs]
            self.starts_host[envs, at] = self._episode_start[envs]
            # The next learner obs starts an episode iff this transition ended one (hidden steps
            # leave the flag set; steps past a full column keep it current for the next rollout).
            self._episode_start[visible] = outcome.done[visible]
            filled = record & (pos == n_steps - 1)
            self.last_dones_host[filled] = outcome.done[filled]
            staging[:, :frame_bytes] = outcome.frames.reshape(n_envs, frame_bytes)
            staging[:, frame_bytes + _FRESH] = outcome.fresh
            staging[:, frame_bytes + _RECORD] = record
            staging[:, frame_bytes + _POS_LO] = pos & 0xFF
            staging[:, frame_bytes + _POS_HI] = pos >> 8
            staging[:, frame_bytes + _BOOT] = outcome.bootstrap & record
            staging[:, frame_bytes + _FILLED] = filled
            pos[envs] += 1
            self._device_step(actions, values, log_probs, gamma,
                              any_bootstrap=bool((outcome.bootstrap & record).any()))
            for _env, score, frames in outcome.episodes:
                self.episode_scores.append(score)
                if model.ep_info_buffer is not None:
                    model.ep_info_buffer.extend([{"r": score, "l": frames}])
            vector_steps += 1
            model.num_timesteps = start_steps + min(vector_steps * n_envs, self.size)
            callback.update_locals({"new_obs": _LazyStack(self.stack)})
            if not callback.on_step():
                return False
        self._finish_rollout(gamma)
        callback.on_rollout_end()
        return True

    @torch.no_grad()
    def _device_step(self, actions: torch.Tensor, values: torch.Tensor,
                     log_probs: torch.Tensor, gamma: float, any_bootstrap: bool) -> None:
        """One H2D copy of frames + flags; record the transitions; advance the frame stacks."""
        staged = self._staging.to(self.device, non_blocking=True)
        fb = self._frame_bytes
        flags = staged[:, fb:].long()
        frames = staged[:, :fb].view(self.n_envs, 1, *self.obs_shape[1:])
        rows = torch.where(flags[:, _RECORD].bool(),
                           self._env_rows + flags[:, _POS_LO] + 256 * flags[:, _POS_HI],
                           self.size)
        self.obs.index_copy_(0, rows, self.stack)
        self.actions.index_copy_(0, rows, actions)
        self.values.index_copy_(0, rows, values)
        self.log_probs.index_copy_(0, rows, log_probs)
        new_stack = torch.cat((self.stack[:, 1:], frames), dim=1)
        if any_bootstrap:  # time-limit truncation: r += gamma * V(terminal observation)
            _, terminal_values = policy_outputs(self.policy, new_stack)
            self.bootstrap.index_add_(0, rows, gamma * terminal_values * flags[:, _BOOT])
        keep = (1 - flags[:, _FRESH]).to(torch.uint8).view(-1, 1, 1, 1)
        new_stack[:, :-1] *= keep
        filled = flags[:, _FILLED].bool().view(-1, 1, 1, 1)
        self.last_stack = torch.where(filled, new_stack, self.last_stack)
        self.stack = new_stack

    @torch.no_grad()
    def _finish_rollout(self, gamma: float) -> None:
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
    def train(self, permutation: Callable[[int], np.ndarray] = np.random.permutation) -> None:
        """One PPO update over the buffer: SB3's PPO.train without its per-minibatch syncs."""
        model, policy = self.model, self.policy
        policy.set_training_mode(True)
        model._update_learning_rate(policy.optimizer)
        clip_range = float(model.clip_range(model._current_progress_remaining))
        if model.clip_range_vf is not None or model.target_kl is not None:
            raise ValueError("FastPPO implements clip_range_vf=None and target_kl=None only")
        n, batch = self.size, int(model.batch_size)
        # One permutation per epoch, drawn as SB3's RolloutBuffer.get draws them.
        order = torch.from_numpy(np.stack([permutation(n) for _ in range(model.n_epochs)]))
        order = order.to(self.device, non_blocking=True)
        obs, actions = self.obs[:n], self.actions[:n]
        old_log_probs, advantages_all, returns = self.log_probs[:n], self.advantages, self.returns
        pg_losses, value_losses, entropy_losses, clip_fractions = [], [], [], []
        approx_kls: list[torch.Tensor] = []
        loss = torch.zeros((), device=self.device)
        parameters = list(policy.parameters())
        self.adam.prepare()
        for epoch in range(model.n_epochs):
            approx_kls = []
            for start in range(0, n, batch):
                with torch.profiler.record_function("satrl::minibatch"):
                    idx = order[epoch, start:start + batch]
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
                    policy.optimizer.zero_grad()
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(parameters, model.max_grad_norm)
                    self.adam.step()
            model._n_updates += 1
        with torch.no_grad():  # every statistic in one device-to-host copy
            flat_values, flat_returns = self.values[:n], self.returns
            var_y = (flat_returns - flat_returns.mean()).square().mean()
            residual = flat_returns - flat_values
            explained = 1 - (residual - residual.mean()).square().mean() / var_y
            stats = torch.stack([
                torch.stack(entropy_losses).mean(), torch.stack(pg_losses).mean(),
                torch.stack(value_losses).mean(), torch.stack(approx_kls).mean(),
                torch.stack(clip_fractions).mean(), loss.detach(), explained, var_y,
            ]).double().cpu().numpy()
        record = model.logger.record
        record("train/entropy_loss", float(stats[0]))
        record("train/policy_gradient_loss", float(stats[1]))
        record("train/value_loss", float(stats[2]))
        record("train/approx_kl", float(stats[3]))
        record("train/clip_fraction", float(stats[4]))
        record("train/loss", float(stats[5]))
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
