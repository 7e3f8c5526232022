"""Start `revacnn train` and `revacnn fork` as their own processes from the live app's forms.

The training never runs inside the web server: the live app launches the ``revacnn`` command
line in a child process (new process group, so a server restart does not kill it), reads the run id
from the first line it prints, and then follows the run through the store like any other.

Example:
    >>> job = launch_train("store", epochs=5, train_size=2000, val_size=500)
    >>> job.wait_run_id(timeout_s=60)
    'run-20261125-220301-4f2a1b'
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import panel as pn
import param

#: Datasets and models offered by the start form (the CLI validates them again).
DATASETS: tuple[str, ...] = ("shapes", "cifar10", "mnist", "fashion_mnist")
MODELS: tuple[str, ...] = ("convnetjs", "revacnn")

_JOBS: list[Job] = []
_JOBS_LOCK = threading.Lock()


def revacnn_command() -> list[str]:
    """The argv prefix that runs the ``revacnn`` CLI with this interpreter.

    Example:
        >>> revacnn_command()[-2:]
        ['-m', 'revacnn.cli']
    """
    return [sys.executable, "-m", "revacnn.cli"]


def train_argv(
    store: str | os.PathLike[str],
    *,
    dataset: str = "shapes",
    model: str = "convnetjs",
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    train_size: int | None = None,
    val_size: int | None = None,
    name: str | None = None,
    data_dir: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The argv of a ``revacnn train`` child process.

    Example:
        >>> train_argv("store", epochs=3)[3:6]
        ['train', '--store', 'store']
    """
    argv = [*revacnn_command(), "train", "--store", str(store), "--dataset", dataset, "--model", model,
            "--epochs", str(int(epochs)), "--batch-size", str(int(batch_size)), "--lr", repr(float(lr)),
            "--seed", str(int(seed)), "--quiet"]
    if train_size:
        argv += ["--train-size", str(int(train_size))]
    if val_size:
        argv += ["--val-size", str(int(val_size))]
    if name:
        argv += ["--name", str(name)]
    if data_dir:
        argv += ["--data-dir", str(data_dir)]
    return argv + list(extra)


def fork_argv(
    store: str | os.PathLike[str],
    run_id: str,
    epoch: int,
    *,
    freeze: Sequence[str] = (),
    freeze_filters: Mapping[str, Sequence[int]] | None = None,
    add_filters: Mapping[str, int] | None = None,
    delete_filters: Mapping[str, Sequence[int]] | None = None,
    reinit_filters: Mapping[str, Sequence[int]] | None = None,
    lr: float | None = None,
    epochs: int | None = None,
    name: str | None = None,
) -> list[str]:
    """The argv of a ``revacnn fork`` child process.

    Example:
        >>> fork_argv("store", "run-1", 3, freeze=["conv1"])[3:]
        ['fork', 'run-1', '--store', 'store', '--epoch', '3', '--quiet', '--freeze', 'conv1']
    """
    argv = [*revacnn_command(), "fork", run_id, "--store", str(store), "--epoch", str(int(epoch)),
            "--quiet"]
    for layer in freeze:
        argv += ["--freeze", layer]
    for flag, spec in (("--freeze-filters", freeze_filters), ("--delete-filters", delete_filters),
                       ("--reinit-filters", reinit_filters)):
        for layer, idx in (spec or {}).items():
            if idx:
                argv += [flag, f"{layer}:{','.join(str(int(i)) for i in idx)}"]
    for layer, n in (add_filters or {}).items():
        if n:
            argv += ["--add-filters", f"{layer}:{int(n)}"]
    if lr is not None:
        argv += ["--lr", repr(float(lr))]
    if epochs is not None:
        argv += ["--epochs", str(int(epochs))]
    if name:
        argv += ["--name", name]
    return argv


@dataclass
class Job:
    """A ``revacnn`` child process started by the app.

    Attributes:
        argv: the command line.
        proc: the process.
        log_path: where its stderr (and stdout after the run id) goes.
        run_id: the run id it printed first, once known.
        started_at: UNIX time of the launch.
    """

    argv: list[str]
    proc: subprocess.Popen[str]
    log_path: Path
    run_id: str | None = None
    started_at: float = field(default_factory=time.time)
    _got_id: threading.Event = field(default_factory=threading.Event)

    @property
    def returncode(self) -> int | None:
        """The exit code, or None while it runs."""
        return self.proc.poll()

    def wait_run_id(self, timeout_s: float = 120.0) -> str | None:
        """Block until the child printed its run id (None if it exited or timed out first)."""
        self._got_id.wait(timeout_s)
        return self.run_id

    def log_tail(self, n_chars: int = 600) -> str:
        """The end of the child's log (its error, when it failed)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text[-n_chars:].strip()

    def terminate(self, timeout_s: float = 10.0) -> None:
        """Stop the child (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _read_stdout(job: Job) -> None:
    assert job.proc.stdout is not None
    try:
        with open(job.log_path, "a") as log:
            for line in job.proc.stdout:
                if job.run_id is None and line.strip().startswith("run-"):
                    job.run_id = line.strip().split()[0]
                    job._got_id.set()
                log.write(line)
                log.flush()
    finally:
        job._got_id.set()
        job.proc.wait()


def launch(argv: Sequence[str], *, log_dir: str | os.PathLike[str] | None = None) -> Job:
    """Start ``argv`` (a ``revacnn train``/``fork`` command) as its own process.

    Its first ``run-…`` stdout line becomes `Job.run_id`; everything else goes to a log file.

    Example:
        >>> job = launch(train_argv("store", epochs=2, train_size=500, val_size=200))
        >>> job.wait_run_id()
    """
    d = Path(log_dir) if log_dir else Path(tempfile.gettempdir()) / "revacnn-launcher"
    d.mkdir(parents=True, exist_ok=True)
    log_path = d / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(_JOBS)}.log"
    env = dict(os.environ)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    log_path.write_text(" ".join(argv) + "\n")
    with open(log_path, "a") as log:  # O_APPEND: the child's stderr and our stdout copy interleave safely
        proc = subprocess.Popen(  # noqa: S603 - argv is built from validated form values
            list(argv), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
            env=env, start_new_session=True,
        )
    job = Job(list(argv), proc, log_path)
    threading.Thread(target=_read_stdout, args=(job,), daemon=True, name="revacnn-job").start()
    with _JOBS_LOCK:
        _JOBS.append(job)
    return job


def launch_train(store: str | os.PathLike[str], **kwargs: Any) -> Job:
    """Start ``revacnn train`` in its own process; keyword arguments as for `train_argv`.

    Example:
        >>> launch_train("store", epochs=20, train_size=3000).wait_run_id()
    """
    return launch(train_argv(store, **kwargs))


def launch_fork(store: str | os.PathLike[str], run_id: str, epoch: int, **kwargs: Any) -> Job:
    """Start ``revacnn fork`` in its own process; keyword arguments as for `fork_argv`.

    Example:
        >>> launch_fork("store", "run-…", 3, freeze=["conv1"]).wait_run_id()
    """
    return launch(fork_argv(store, run_id, epoch, **kwargs))


def jobs() -> list[Job]:
    """Every child process this server started (finished ones included)."""
    with _JOBS_LOCK:
        return list(_JOBS)


class _JobWatcher(param.Parameterized):
    """Shared by both forms: shows a launch's progress until its run id is known."""

    message = param.String(default="")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.job: Job | None = None
        self.alert = pn.pane.Alert("", alert_type="light", visible=False, margin=(5, 5),
                                   css_classes=["rv-launch-status"])

    def start(self, job: Job, what: str) -> None:
        self.job = job
        self._what = what
        self.alert.object = f"Starting {what}… (TensorFlow takes a few seconds to load)"
        self.alert.alert_type = "info"
        self.alert.visible = True

    def check(self) -> str | None:
        """Poll the job; return its run id once, when it becomes known."""
        job = self.job
        if job is None:
            return None
        if job.run_id:
            self.alert.object = f"Started {self._what}: **{job.run_id}** (pid {job.proc.pid})"
            self.alert.alert_type = "success"
            self.job = None
            return job.run_id
        rc = job.returncode
        if rc is not None and job._got_id.is_set():
            tail = job.log_tail().splitlines()
            reason = tail[-1] if tail else f"exit code {rc}"
            self.alert.object = f"Could not start {self._what}: {reason}"
            self.alert.alert_type = "danger"
            self.job = None
        return None


class StartRunForm(pn.viewable.Viewer):
    """The form that starts a new ``revacnn train`` process (dataset, model, epochs, batch, lr, seed).

    Example:
        >>> form = StartRunForm(store_path="store")
        >>> form.start()  # what the Start button does
        >>> form.poll()   # call periodically; returns the new run id once it is known
    """

    store_path = param.String(doc="the store the child process records into")
    dataset = param.Selector(default="shapes", objects=list(DATASETS))
    model = param.Selector(default="convnetjs", objects=list(MODELS))
    epochs = param.Integer(default=10, bounds=(1, 10000))
    batch_size = param.Integer(default=64, bounds=(1, 65536))
    lr = param.Number(default=1e-3, bounds=(0, None), inclusive_bounds=(False, True))
    seed = param.Integer(default=0)
    train_size = param.Integer(default=5000, bounds=(1, None))
    val_size = param.Integer(default=1000, bounds=(1, None))
    run_name = param.String(default="", label="Name", doc="a name for the run (default: its id)")
    enabled = param.Boolean(default=True, doc="False when the app may not start processes")

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        self.watcher = _JobWatcher()
        self.button = pn.widgets.Button(label="Start training", color="primary",
                                        css_classes=["rv-start-run"])
        self.button.on_click(lambda _e: self.start())
        widgets = pn.Param(
            self, parameters=["dataset", "model", "epochs", "batch_size", "lr", "seed", "train_size",
                              "val_size", "run_name"],
            widgets={
                "dataset": {"type": pn.widgets.Select, "css_classes": ["rv-form-dataset"]},
                "model": {"type": pn.widgets.Select, "css_classes": ["rv-form-model"]},
                "lr": {"type": pn.widgets.FloatInput, "step": 1e-4, "format": "0.[00000]",
                       "css_classes": ["rv-form-lr"]},
                **{k: {"type": pn.widgets.IntInput, "css_classes": [f"rv-form-{k.replace('_', '-')}"]}
                   for k in ("epochs", "batch_size", "seed", "train_size", "val_size")},
                "run_name": {"type": pn.widgets.TextInput, "css_classes": ["rv-form-name"]},
            },
            show_name=False, default_layout=pn.Column, sizing_mode="stretch_width",
        )
        self._layout = pn.Column(widgets, self.button, self.watcher.alert, sizing_mode="stretch_width")
        self.param.watch(self._sync_enabled, "enabled")
        self._sync_enabled()

    def _sync_enabled(self, *_: Any) -> None:
        self.button.disabled = not self.enabled

    def start(self) -> Job | None:
        """Launch ``revacnn train`` with the form's values (non-blocking)."""
        if not self.enabled:
            return None
        job = launch_train(
            self.store_path, dataset=self.dataset, model=self.model, epochs=self.epochs,
            batch_size=self.batch_size, lr=self.lr, seed=self.seed, train_size=self.train_size,
            val_size=self.val_size, name=self.run_name or None,
        )
        self.watcher.start(job, f"{self.model} on {self.dataset}")
        return job

    def poll(self) -> str | None:
        """The new run's id, once (call from a periodic callback)."""
        return self.watcher.check()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout


class ForkForm(pn.viewable.Viewer):
    """The "fork from this epoch" form: launches ``revacnn fork RUN --epoch K`` with changes.

    The epoch follows the run's newest recorded epoch until the user picks another one.

    Example:
        >>> form = ForkForm(store_path="store", run_id="run-…", epochs_available=[0, 1, 2],
        ...                 layers=["conv1", "conv2"])
        >>> form.w_freeze.value = ["conv1"]; form.start()
    """

    store_path = param.String()
    run_id = param.String(default=None, allow_None=True)
    epochs_available = param.List(default=[], item_type=int)
    layers = param.List(default=[], item_type=str)
    enabled = param.Boolean(default=True)

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        W = pn.widgets
        self.watcher = _JobWatcher()
        self.w_epoch = W.Select(label="Fork at epoch", options=[], css_classes=["rv-fork-epoch"])
        self.w_freeze = W.MultiChoice(label="Freeze layers", options=[], css_classes=["rv-fork-freeze"])
        self.w_add_layer = W.Select(label="Add filters to", options=[], css_classes=["rv-fork-add-layer"])
        self.w_add_n = W.IntInput(label="How many new filters", value=0, start=0, end=512,
                                  css_classes=["rv-fork-add-n"])
        self.w_lr = W.FloatInput(label="Learning rate (empty: the run's)", value=None, start=0,
                                 css_classes=["rv-fork-lr"])
        self.w_epochs = W.IntInput(label="Train up to epoch (empty: the run's)", value=None, start=0,
                                   css_classes=["rv-fork-epochs"])
        self.w_name = W.TextInput(label="Name", placeholder="default: the fork's id", css_classes=["rv-fork-name"])
        self.button = W.Button(label="Start the fork", color="primary", css_classes=["rv-start-fork"])
        self.button.on_click(lambda _e: self.start())
        self._follow_latest = True
        self.w_epoch.param.watch(self._picked, "value")
        self.param.watch(self._sync, ["epochs_available", "layers", "enabled", "run_id"])
        self._sync()
        self._layout = pn.Column(self.w_epoch, self.w_freeze, pn.Row(self.w_add_layer, self.w_add_n),
                                 self.w_lr, self.w_epochs, self.w_name, self.button, self.watcher.alert,
                                 sizing_mode="stretch_width")

    def _picked(self, event: Any) -> None:
        if not self._syncing:
            eps = list(self.epochs_available)
            self._follow_latest = bool(eps) and event.new == eps[-1]

    _syncing = False

    def _sync(self, *_: Any) -> None:
        self._syncing = True
        try:
            eps = list(self.epochs_available)
            if list(self.w_epoch.options) != eps:
                self.w_epoch.options = eps
            if eps and (self._follow_latest or self.w_epoch.value not in eps):
                self.w_epoch.value = eps[-1]
            layers = list(self.layers)
            if list(self.w_freeze.options) != layers:
                self.w_freeze.options = layers
                self.w_freeze.value = [x for x in self.w_freeze.value if x in layers]
            if list(self.w_add_layer.options) != layers:
                self.w_add_layer.options = layers
                if self.w_add_layer.value not in layers:
                    self.w_add_layer.value = layers[0] if layers else None
        finally:
            self._syncing = False
        self.button.disabled = not (self.enabled and self.run_id and self.epoch is not None)

    @property
    def epoch(self) -> int | None:
        """The epoch the fork starts from."""
        return self.w_epoch.value

    def select_latest(self) -> None:
        """Fork from the newest recorded epoch (what "Fork from this epoch…" asks for)."""
        self._follow_latest = True
        self._sync()

    def start(self) -> Job | None:
        """Launch the fork (non-blocking)."""
        if not (self.enabled and self.run_id and self.epoch is not None):
            return None
        layer, n = self.w_add_layer.value, int(self.w_add_n.value or 0)
        add = {layer: n} if layer and n else None
        job = launch_fork(self.store_path, self.run_id, int(self.epoch), freeze=list(self.w_freeze.value),
                          add_filters=add, lr=self.w_lr.value or None, epochs=self.w_epochs.value,
                          name=self.w_name.value or None)
        self.watcher.start(job, f"a fork of {self.run_id} at epoch {self.epoch}")
        return job

    def poll(self) -> str | None:
        """The fork's run id, once (call from a periodic callback)."""
        return self.watcher.check()

    def __panel__(self) -> pn.viewable.Viewable:
        return self._layout
