"""The training worker: `python -m agents.train RUN_DIR`.

Reads RUN_DIR/run.json, trains the paper's PPO agent and writes every file of the run-directory
contract (ARCHITECTURE.md). It touches no database and talks to no orchestrator: the job script
starts it, and started again on the same directory it resumes.

One attempt, top to bottom:
 1. Install the signal handlers, take RUN_DIR's lock, read and validate run.json (before
    importing torch: a bad spec fails in a fraction of a second), also against the spec hash
    that trained the directory's checkpoints. Invalid: one line on stderr, exit code 2, and
    exit.json with reason failed (unless a finished run's exit.json is there).
 2. Finished already (exit.json says done and the final checkpoint is intact): exit 0.
 3. Number the attempt (1 + entries of provenance.json), record provenance, start status.json.
 4. Load the newest checkpoint that loads; truncated or corrupt ones are deleted with a warning.
    Evaluations, metrics rows and observation dumps newer than it are dropped, to be redone.
 5. learn() up to total_timesteps with the callbacks of agents.callbacks; the lr and clip
    schedules see progress relative to total_timesteps, so they continue across attempts.
 6. Exit: a checkpoint at the final step (only here, after the last update), the final
    manifest, exit.json last.
    done 0, failed 1, invalid run.json 2, walltime 75 (SIGUSR1 or SATRL_DEADLINE minus the
    spec's margin), signal 143 (SIGTERM, SIGINT).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import lzma
import math
import os
import platform
import socket
import sys
import time
import traceback
import zipfile
import zlib
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents import rundir
from agents.spec import RunSpec, SpecError
from agents.stop import EXIT_CODES, StopRequest

if TYPE_CHECKING:  # heavy imports happen after run.json has been validated
    from stable_baselines3 import PPO

    from agents.callbacks import MetricsTable, StatusHeartbeat

class WorkerError(RuntimeError):
    """A failure whose message is the whole story (no traceback): a checkpoint that does not
    belong to this run, or does not load."""


#: Exit code of an invalid run.json (exit.json's reason is still `failed`).
EXIT_INVALID_SPEC = 2
#: Exit code when another worker trains in the same run directory: nothing is touched.
EXIT_BUSY = 3
#: run.json is a few kB; refuse to parse anything larger than this.
MAX_RUN_JSON_BYTES = 1 << 20
#: Packages recorded in provenance.json (distribution names).
PROVENANCE_PACKAGES = ("satrl", "torch", "stable-baselines3", "gymnasium", "ale-py", "numpy")


def new_ppo(spec: RunSpec, env: Any, tensorboard_log: Path | None = None) -> PPO:
    """A fresh PPO for `spec` on `env`: the paper's hyper-parameters and the spec's attention.

    The one place a model is built, so the worker, the fast engine's tests and the benchmarks
    train the same agent (schedules included).
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.utils import ConstantSchedule, LinearSchedule

    from agents.extractor import policy_kwargs

    def schedule(start: float, kind: str) -> Any:
        return LinearSchedule(start, 0.0, 1.0) if kind == "linear" else ConstantSchedule(start)

    return PPO(
        "CnnPolicy", env,
        learning_rate=schedule(spec.learning_rate, spec.lr_schedule),
        n_steps=spec.n_steps, batch_size=spec.batch_size, n_epochs=spec.n_epochs,
        gamma=spec.gamma, gae_lambda=spec.gae_lambda,
        clip_range=schedule(spec.clip_range, spec.clip_schedule),
        normalize_advantage=spec.normalize_advantage, ent_coef=spec.ent_coef,
        vf_coef=spec.vf_coef, max_grad_norm=spec.max_grad_norm,
        tensorboard_log=None if tensorboard_log is None else str(tensorboard_log),
        policy_kwargs=policy_kwargs(spec.attn), seed=spec.seed, device=spec.device,
        verbose=0,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agents.train",
        description="Train one satrl run in RUN_DIR from its run.json, resuming from its newest "
                    "checkpoint. Writes status.json, metrics.csv, evaluations.npz, checkpoints/, "
                    "observations/, monitor/, tb/, provenance.json, manifest.json and, last, "
                    "exit.json. Exit codes: 0 done, 1 failed, 2 invalid run.json, 3 another worker "
                    "trains in RUN_DIR (nothing touched), 75 walltime (SIGUSR1 or "
                    "SATRL_DEADLINE), 143 signal (SIGTERM).",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path,
                        help="run directory holding run.json (written by the orchestrator)")
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    # First: a SIGTERM while torch loads (seconds) must still end with this attempt's exit.json.
    stop = StopRequest()
    stop.install_handlers()
    if not run_dir.is_dir():
        _error_line(f"run directory {run_dir} does not exist: create it with a run.json first")
        return EXIT_INVALID_SPEC
    if not (run_dir / rundir.RUN_JSON).is_file():
        _error_line(f"{run_dir} holds no {rundir.RUN_JSON} (the orchestrator writes it before "
                    "submission); nothing written")
        return EXIT_INVALID_SPEC
    # Read-only until the lock is held: a finished run stays exactly as it is.
    try:
        spec: RunSpec | None = read_spec(run_dir)
        check_same_spec(run_dir, spec)
        problem = None
    except SpecError as error:
        spec, problem = None, f"invalid {rundir.RUN_JSON}: {error}"
    if spec is not None and is_finished(run_dir, spec):
        print(f"{run_dir}: finished already at {spec.total_timesteps} steps; nothing to do")
        return 0
    try:
        lock = lock_run_dir(run_dir)
        if isinstance(lock, str):
            _error_line(problem or f"another worker ({lock}) is training in {run_dir}; this one "
                        "exits without touching it")
            return EXIT_INVALID_SPEC if problem else EXIT_BUSY
        try:
            if spec is None:
                return _refuse(run_dir, str(problem))
            return Worker(run_dir, spec, stop).run()
        finally:
            if lock is not None:
                os.close(lock)  # releases it (the kernel does too, however the process ends)
    except OSError as error:  # e.g. a read-only or full filesystem where even exit.json fails
        _error_line(f"cannot write in {run_dir}: {error}")
        return EXIT_CODES["failed"]


def _refuse(run_dir: Path, message: str) -> int:
    """An invalid run.json: one line, and exit.json unless a finished run's is there."""
    _error_line(message)
    if not _exit_says_done(run_dir):  # a finished run's exit.json stays the truth about it
        _write_exit(run_dir, "failed", EXIT_INVALID_SPEC, message,
                    timesteps=_newest_checkpoint_step(run_dir), attempt=_next_attempt(run_dir))
    return EXIT_INVALID_SPEC


def lock_run_dir(run_dir: Path) -> int | str | None:
    """Take RUN_DIR's worker lock: its open descriptor (close it to release), or who holds it.

    Two workers in one directory (a job requeued while its first attempt still runs) would
    write the same checkpoints and logs over each other. The lock is flock(2) on
    RUN_DIR/.worker.lock, released by the kernel when the process ends, however it ends. A
    filesystem without flock (ENOLCK, EOPNOTSUPP) gets a warning and no lock (None).
    """
    import fcntl

    path = run_dir / rundir.WORKER_LOCK
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as error:  # the worker's own writes will say what is wrong
        print(f"satrl worker: warning: cannot open {path}: {error.strerror}", file=sys.stderr,
              flush=True)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return holder
    except OSError as error:
        print(f"satrl worker: warning: {path.parent} cannot be locked ({error.strerror}); "
              "another worker in it would not be noticed", file=sys.stderr, flush=True)
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def read_spec(run_dir: Path) -> RunSpec:
    """The validated spec of run.json; SpecError (one line) for anything wrong with it."""
    path = run_dir / rundir.RUN_JSON
    try:
        size = path.stat().st_size
        if size > MAX_RUN_JSON_BYTES:
            raise SpecError(f"the file is {size} bytes, more than {MAX_RUN_JSON_BYTES}")
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SpecError(f"{path} is missing: the orchestrator writes it before submission") \
            from None
    except (OSError, ValueError, RecursionError) as error:
        raise SpecError(f"not readable JSON ({type(error).__name__}: {error})") from None
    try:
        return RunSpec.from_dict(data)
    except SpecError:
        raise
    except (TypeError, ValueError) as error:  # e.g. a field name that is not an identifier
        raise SpecError(str(error)) from None


def is_finished(run_dir: Path, spec: RunSpec) -> bool:
    """exit.json says done and the checkpoint at total_timesteps is there and intact."""
    final = rundir.checkpoint_path(run_dir, spec.total_timesteps)
    return _exit_says_done(run_dir) and final.is_file() and _zip_problem(final) is None


def _exit_says_done(run_dir: Path) -> bool:
    exit_info = rundir.read_json(run_dir / rundir.EXIT_JSON)
    return isinstance(exit_info, dict) and exit_info.get("reason") == "done"


def check_same_spec(run_dir: Path, spec: RunSpec) -> None:
    """SpecError when the directory's checkpoints were trained under other scientific settings.

    Every attempt records its spec hash in provenance.json; a run.json edited between attempts
    (another seed, learning rate or game) would otherwise resume, or count as finished, with
    weights and metrics that belong to a different experiment.
    """
    if not rundir.list_checkpoints(run_dir):
        return
    recorded = [(a.get("attempt"), a["spec_hash"]) for a in _previous_attempts(run_dir)
                if isinstance(a.get("spec_hash"), str)]
    if recorded and recorded[-1][1] != spec.spec_hash():
        attempt, trained = recorded[-1]
        raise SpecError(
            f"its scientific settings (spec hash {spec.spec_hash()[:12]}) are not the ones that "
            f"trained this directory's checkpoints (hash {trained[:12]}, attempt {attempt}): "
            "queue a new run for new settings"
        )


#: OSErrors that are the storage's, not the worker's: a full disk or quota, a read-only or
#: forbidden folder. One line says which; a traceback would bury it.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def storage_problem(error: BaseException, run_dir: Path) -> str | None:
    """One line for an error of the storage the run directory is on; None for any other."""
    if not isinstance(error, OSError) or error.errno not in STORAGE_ERRNOS:
        return None
    where = error.filename or run_dir  # a write() to an open file names none
    return f"cannot write {where}: {error.strerror or os.strerror(error.errno)}"


def _error_line(message: str) -> None:
    print(f"satrl worker: error: {' '.join(message.split())}", file=sys.stderr, flush=True)


def _previous_attempts(run_dir: Path) -> list[dict[str, Any]]:
    data = rundir.read_json(run_dir / rundir.PROVENANCE_JSON)
    attempts = data.get("attempts") if isinstance(data, dict) else None
    return [a for a in attempts if isinstance(a, dict)] if isinstance(attempts, list) else []


def _next_attempt(run_dir: Path) -> int:
    return 1 + len(_previous_attempts(run_dir))


def _newest_checkpoint_step(run_dir: Path) -> int:
    checkpoints = rundir.list_checkpoints(run_dir)
    return checkpoints[-1][0] if checkpoints else 0


def _write_exit(run_dir: Path, reason: str, exit_code: int, message: str, timesteps: int,
                attempt: int) -> None:
    rundir.write_json(run_dir / rundir.EXIT_JSON, {
        "exit_code": exit_code, "reason": reason, "message": " ".join(message.split()),
        "timesteps": int(timesteps), "attempt": attempt, "ended_at": time.time(),
    })


# --- provenance -------------------------------------------------------------------------------

def _package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """Commit of the installed project: what the image says (SATRL_GIT_COMMIT, set at build),
    pip's direct_url.json, else the checkout it runs from."""
    from_image = os.environ.get("SATRL_GIT_COMMIT", "").strip()
    if from_image and from_image != "unknown":
        dirty = os.environ.get("SATRL_GIT_DIRTY") == "true"
        return from_image + ("+dirty" if dirty else "")
    try:
        direct_url = json.loads(metadata.distribution("satrl").read_text("direct_url.json") or "")
        commit = direct_url.get("vcs_info", {}).get("commit_id")
        if commit:
            return str(commit)
    except (metadata.PackageNotFoundError, ValueError, AttributeError):
        pass
    # An editable install or a plain checkout: read .git without running git.
    git_dir = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        ref_file = git_dir / ref
        if ref_file.is_file():
            return ref_file.read_text().strip() or None
        packed = git_dir / "packed-refs"
        for line in packed.read_text().splitlines() if packed.is_file() else []:
            sha, _, name = line.partition(" ")
            if name == ref:
                return sha
    except OSError:
        pass
    return None


def provenance_entry(
    attempt: int, started_at: float, resumed_from_step: int | None, spec_hash: str | None = None
) -> dict[str, Any]:
    """Where and with what this attempt runs (one entry of provenance.json's attempts)."""
    import torch

    return {
        "attempt": attempt,
        "started_at": started_at,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "python": platform.python_version(),
        "packages": {name: _package_version(name) for name in PROVENANCE_PACKAGES},
        "git_commit": _git_commit(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "rocm": getattr(torch.version, "hip", None),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "image_digest": os.environ.get("SATRL_IMAGE_DIGEST") or None,
        "scheduler_job_id": os.environ.get("SLURM_JOB_ID") or os.environ.get("PBS_JOBID") or None,
        "resumed_from_step": resumed_from_step,
        "spec_hash": spec_hash,
    }


def _deadline_from_env() -> float | None:
    raw = os.environ.get("SATRL_DEADLINE")
    if not raw:
        return None
    try:
        deadline = float(raw)
    except ValueError:
        deadline = math.nan
    if not math.isfinite(deadline):
        raise SpecError(f"SATRL_DEADLINE must be epoch seconds, got {raw[:40]!r}")
    return deadline


# --- the worker ---------------------------------------------------------------------------------

class Worker:
    """One attempt at one run directory."""

    def __init__(self, run_dir: Path, spec: RunSpec, stop: StopRequest | None = None) -> None:
        self.run_dir = run_dir
        self.spec = spec
        # main() installs the handlers before the heavy imports; a Worker alone installs them.
        self._early_stop = stop
        self.started_at = time.time()
        self.attempt = _next_attempt(run_dir)
        self.model: PPO | None = None
        self.manifest = rundir.ManifestBuilder(run_dir)
        self.heartbeat: StatusHeartbeat | None = None
        self.metrics: MetricsTable | None = None
        self.stop: StopRequest | None = None

    def run(self) -> int:
        """Train, then write the exit files; returns the process exit code."""
        try:
            deadline = _deadline_from_env()
        except SpecError as error:
            _error_line(str(error))
            _write_exit(self.run_dir, "failed", EXIT_INVALID_SPEC, str(error),
                        _newest_checkpoint_step(self.run_dir), self.attempt)
            return EXIT_INVALID_SPEC
        if self._early_stop is not None:  # keeps any signal that arrived during start-up
            self.stop = self._early_stop
            self.stop.deadline, self.stop.margin_s = deadline, self.spec.deadline_margin_s
        else:
            self.stop = StopRequest(deadline, self.spec.deadline_margin_s)
            self.stop.install_handlers()
        (self.run_dir / rundir.EXIT_JSON).unlink(missing_ok=True)  # exists only after an exit
        rundir.remove_temp_files(self.run_dir)
        try:
            self._train()
            timesteps = self._timesteps()
            if timesteps >= self.spec.total_timesteps:
                reason = "done"
                message = f"trained {timesteps} of {self.spec.total_timesteps} steps"
            elif self.stop.reason is not None:
                reason = self.stop.reason
                saved = f"checkpoint at {timesteps} steps" if timesteps else "no checkpoint yet"
                message = f"{self.stop.message}; {saved}"
            else:  # learn() returned early without a stop request: should not happen
                reason, message = "failed", f"training ended early at {timesteps} steps"
            code = EXIT_CODES[reason]
        except WorkerError as error:  # a known cause: its one line says it all
            reason, code, message = "failed", EXIT_CODES["failed"], str(error)
            _error_line(message)
        except Exception as error:  # anything: the orchestrator needs an exit.json
            storage = storage_problem(error, self.run_dir)
            if storage is None:  # not the disk's fault: the traceback is what a developer needs
                traceback.print_exc()
            reason, code = "failed", EXIT_CODES["failed"]
            message = storage or f"{type(error).__name__}: {error}"
            _error_line(message)
        self._finish(reason, code, message)
        print(f"satrl worker: exit {code} ({reason}): {message}", flush=True)
        return code

    def _timesteps(self) -> int:
        """The run's step count: the model's, or the newest checkpoint's before one is loaded."""
        if self.model is not None:
            return int(self.model.num_timesteps)
        return _newest_checkpoint_step(self.run_dir)

    def _train(self) -> None:
        import torch
        from stable_baselines3.common.callbacks import CallbackList

        from agents.callbacks import (
            CheckpointCallback,
            EvaluationCallback,
            EvaluationHistory,
            MetricsCallback,
            MetricsTable,
            ObservationDumpCallback,
            StatusCallback,
            StatusHeartbeat,
            StopCallback,
        )
        from agents.envs import EVAL_SEED_OFFSET, make_eval_env, make_train_env

        spec, run_dir = self.spec, self.run_dir
        assert self.stop is not None
        if spec.device == "cuda" and not torch.cuda.is_available():
            # SB3 would fall back to the CPU in silence: a GPU node whose driver is broken
            # would spend its walltime at a tenth of the speed. `auto` is the fallback.
            raise WorkerError("device cuda was asked for, but torch sees no CUDA device "
                              f"(torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
                              f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
                              "device auto trains on the CPU where there is none")
        self.heartbeat = StatusHeartbeat(run_dir, spec.status_every_s, spec.total_timesteps,
                                         self.attempt, self.started_at)
        self.heartbeat.start()
        self._record_provenance(resumed_from_step=None)  # numbers the attempt even if we crash
        if spec.torch_threads > 0:
            torch.set_num_threads(spec.torch_threads)

        self.model = self._load_newest_checkpoint()
        resumed = self.model.num_timesteps if self.model is not None else None
        step = resumed or 0
        if resumed is not None:
            self._record_provenance(resumed_from_step=resumed)
        self.heartbeat.timesteps = step

        history = EvaluationHistory(run_dir / rundir.EVALUATIONS_NPZ)
        metrics = self.metrics = MetricsTable(run_dir / rundir.METRICS_CSV)
        # A checkpoint below the budget is taken in on_step, before the update of the rollout
        # that ends at its step (or at a stop, which skips that update): a metrics row at the
        # checkpoint's own step describes an update the checkpoint does not hold.
        kept_rows_until = step if step >= spec.total_timesteps else step - 1
        dropped = (history.drop_after(step), metrics.drop_after(kept_rows_until),
                   self._drop_dumps_after(step), self._trim_monitors(step, resumed is not None))
        # The evaluation monitor holds one line per episode of evaluations.npz (and those of
        # an evaluation cut by the stop, which is redone): it keeps exactly those of the npz.
        rundir.keep_monitor_episodes(run_dir / rundir.MONITOR_DIR / "eval.monitor.csv",
                                     sum(len(results) for results in history.results))
        print(f"satrl worker: {run_dir} attempt {self.attempt}: "
              + (f"resuming from step {step}" if resumed is not None else "starting from step 0")
              + (f"; dropped {dropped[0]} evaluations, {dropped[1]} metrics rows, "
                 f"{dropped[2]} observation dumps and {dropped[3]} training episodes newer "
                 "than that" if any(dropped) else ""),
              flush=True)

        # A resumed attempt gets fresh env seeds, so that it does not replay attempt 1's episodes.
        seed = spec.seed + step
        monitor_dir = run_dir / rundir.MONITOR_DIR
        monitor_dir.mkdir(parents=True, exist_ok=True)
        source = None  # the fast path's games (agents.fast); SB3 then only sees a stand-in
        if spec.engine == "fast":
            from agents.fast.ale_env import AtariVectorSource

            source = AtariVectorSource(spec, monitor_dir=monitor_dir, append_monitor=True)
            train_env = source.stand_in()
        else:
            train_env = make_train_env(spec, monitor_dir, seed=seed, append_monitor=True)
        eval_env = make_eval_env(spec, monitor_dir, seed=spec.seed + EVAL_SEED_OFFSET + step,
                                 append_monitor=True)
        try:
            if self.model is None:
                self.model = new_ppo(self.spec, train_env,
                                     tensorboard_log=self.run_dir / rundir.TB_DIR)
            else:
                self.model.set_env(train_env)
                self.model.set_random_seed(seed)
            self.model.tensorboard_log = str(run_dir / rundir.TB_DIR)
            callbacks = CallbackList([
                StatusCallback(self.heartbeat),
                EvaluationCallback(eval_env, history, spec.eval_every_steps, spec.eval_episodes,
                                   spec.eval_deterministic, self.stop, self.heartbeat),
                ObservationDumpCallback(run_dir, spec.obs_dump_every_steps, spec.obs_dump_count),
                CheckpointCallback(spec.checkpoint_every_steps, spec.total_timesteps,
                                   self.save_checkpoint),
                MetricsCallback(metrics),
                StopCallback(self.stop, spec.total_timesteps),
            ])
            remaining = max(spec.total_timesteps - self.model.num_timesteps, 0)
            updates_at_start = self.model._n_updates
            if self.stop.poll() is None:
                # reset_num_timesteps=False: SB3 sets its total to num_timesteps + remaining =
                # total_timesteps, so progress_remaining (lr, clip) continues across attempts.
                if source is not None:  # same algorithm and callbacks, device-resident loop
                    from agents.fast.engine import FastPPO

                    # cuda_graphs under device auto: graphs where the device is a GPU.
                    graphs = spec.cuda_graphs and self.model.device.type == "cuda"
                    engine = FastPPO(self.model, source, cuda_graphs=graphs)
                    engine.learn(remaining, callback=callbacks, log_interval=1,
                                 tb_log_name="PPO", reset_num_timesteps=False, seed=seed)
                else:
                    self.model.learn(remaining, callback=callbacks, log_interval=1,
                                     tb_log_name="PPO", reset_num_timesteps=False)
            learned = self.model._n_updates > updates_at_start
            if not learned and self.model.num_timesteps < spec.total_timesteps:
                # Stopped before the first update (e.g. during a resumed run's catch-up
                # evaluation): the weights are the loaded checkpoint's, so it stays the resume
                # point. Saving them a few env steps later would move the schedule's events
                # (that evaluation would be redone and stamped at the later step). A scheduled
                # checkpoint taken meanwhile holds the same weights: the newest is the point.
                self.model.num_timesteps = max(step, _newest_checkpoint_step(run_dir))
            self.heartbeat.timesteps = self.model.num_timesteps
            if self.model.num_timesteps > step:
                # Always, even where the schedule saved at this step already: a scheduled
                # checkpoint is taken in on_step, before the update of the rollout that ends
                # there, and the last update must not be lost.
                self.save_checkpoint(self.model.num_timesteps, phase_after="exiting")
        finally:
            if self.model is not None:
                # Flush TensorBoard before the final manifest (no logger if learn() never ran).
                with contextlib.suppress(AttributeError):
                    self.model.logger.close()
            train_env.close()
            eval_env.close()
            if source is not None:
                source.close()

    def _load_newest_checkpoint(self) -> PPO | None:
        """The newest checkpoint that loads; truncated or corrupt zips are deleted, warned about.

        A checkpoint whose zip is intact but does not load (another attention type, a newer SB3)
        is an error, not a reason to start over: that would throw away the run's progress.
        """
        from stable_baselines3 import PPO

        for step, path in reversed(rundir.list_checkpoints(self.run_dir)):
            problem = _zip_problem(path)
            if problem is not None:
                print(f"satrl worker: warning: skipping checkpoint {path.name} "
                      f"({path.stat().st_size} bytes): {problem}; deleting it", file=sys.stderr,
                      flush=True)
                path.unlink(missing_ok=True)
                continue
            try:
                model = PPO.load(path, device=self.spec.device)
            except Exception as error:
                raise WorkerError(f"checkpoint {path.name} is intact but does not load: "
                                   f"{type(error).__name__}: {error}") from error
            self._check_matches_spec(model, path, step)
            return model
        return None

    def _check_matches_spec(self, model: PPO, path: Path, step: int) -> None:
        extractor_kwargs = model.policy_kwargs.get("features_extractor_kwargs", {})
        attn = extractor_kwargs.get("self_attn")
        if attn != self.spec.attn or model.n_envs != self.spec.n_envs:
            raise WorkerError(f"checkpoint {path.name} has attn={attn}, n_envs={model.n_envs}; "
                               f"run.json has attn={self.spec.attn}, n_envs={self.spec.n_envs}")
        if model.num_timesteps != step:
            raise WorkerError(f"checkpoint {path.name} holds num_timesteps="
                               f"{model.num_timesteps}, not the {step} of its name")

    def _trim_monitors(self, step: int, resumed: bool) -> int:
        """Drop training episodes after `step`; when resuming, mark where this attempt's
        episodes start (its envs reset there: see rundir.RESUME_MARK_KEY)."""
        folder = self.run_dir / rundir.MONITOR_DIR
        dropped = 0
        for path in sorted(folder.glob("train_*.monitor.csv")):
            dropped += rundir.trim_monitor(path, step, self.spec.n_envs, self.spec.frame_skip)
            if resumed:
                with path.open("a") as handle:  # after the Monitor's last complete line
                    handle.write(rundir.resume_mark(step))
        return dropped

    def _drop_dumps_after(self, step: int) -> int:
        folder = self.run_dir / rundir.OBSERVATIONS_DIR
        dropped = 0
        for path in folder.glob("obs_*.npy") if folder.is_dir() else []:
            dump_step = rundir.observation_step(path)
            if dump_step is not None and dump_step > step:
                path.unlink()
                dropped += 1
        return dropped

    def save_checkpoint(self, steps: int, phase_after: str = "training") -> None:
        """checkpoints/model_checkpoint_<steps>_steps.zip, then a fresh (non-final) manifest."""
        assert self.model is not None and self.heartbeat is not None
        self.heartbeat.set_phase("checkpointing")
        if self.metrics is not None:  # the rows up to here, on disk before the checkpoint
            self.metrics.sync()
        with rundir.atomic_writer(rundir.checkpoint_path(self.run_dir, steps)) as handle:
            self.model.save(handle)
        self.manifest.write(final=False)
        self.heartbeat.set_phase(phase_after)

    def _record_provenance(self, resumed_from_step: int | None) -> None:
        """Add (or, on the second call, update) this attempt's entry in provenance.json."""
        attempts = [a for a in _previous_attempts(self.run_dir) if a.get("attempt") != self.attempt]
        attempts.append(provenance_entry(self.attempt, self.started_at, resumed_from_step,
                                         self.spec.spec_hash()))
        rundir.write_json(self.run_dir / rundir.PROVENANCE_JSON, {"attempts": attempts})

    def _finish(self, reason: str, code: int, message: str) -> None:
        """Last status, final manifest, exit.json: in this order, each atomic."""
        if self.heartbeat is not None:
            self.heartbeat.stop()
            self.heartbeat.phase = "exiting"
            self.heartbeat.timesteps = self._timesteps()
            self.heartbeat.write()
        try:
            self.manifest.write(final=True)
        except OSError as error:
            _error_line(f"could not write the final manifest: {error}")
        _write_exit(self.run_dir, reason, code, message, self._timesteps(), self.attempt)


def _zip_problem(path: Path) -> str | None:
    """Why a checkpoint zip is unreadable (truncated, bad CRC), or None if it is intact."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = set(archive.namelist())
    # testzip decompresses each member: a damaged deflated one raises zlib's error, not CRC's.
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error,
            lzma.LZMAError, NotImplementedError) as error:
        return f"{type(error).__name__}: {error}"
    if bad is not None:
        return f"member {bad} fails its CRC check"
    missing = {"data", "policy.pth"} - names
    return f"no {', '.join(sorted(missing))} inside" if missing else None


if __name__ == "__main__":
    sys.exit(main())
