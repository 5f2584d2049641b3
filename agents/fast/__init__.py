"""The fast path of the worker: a device-resident PPO loop fed by ale-py's AtariVectorEnv.

Selected by the run spec's execution fields `engine="fast"` with `env_backend="ale_vector"`
(neither is hashed: the algorithm and the protocol are the reference path's).

- `agents.fast.ale_env`: the training environments. ale-py's C++ vector env does the emulation,
  frame skip 4 with max-pool, grayscale and the 84x84 INTER_AREA resize; this module adds what
  SB3's AtariWrapper does and the vector env does not do the same way: life loss as an episode
  end for the learner (ale-py's own `episodic_life` restarts the whole game), the hidden steps
  that SB3 runs inside a reset (NOOP, FIRE, 2 after a lost life; FIRE, 2 after a new game),
  reward clipping for the learner only, raw full-game scores, bootstrapping on truncation.
- `agents.fast.engine`: `FastPPO`, SB3 PPO's rollout and update on SB3's own policy object (so
  checkpoints are the plain SB3 zips `PPO.load` opens), with the observations, the rollout
  buffer and GAE on the device, one host-to-device copy of observations and one
  device-to-host copy of actions per step, and no host synchronisation inside the update's
  minibatch loop.

Differences from the reference path that a synchronous vector env cannot remove (tested in
tests/test_fast_env.py, listed in `ale_env.DIFFERENCES`).
"""
