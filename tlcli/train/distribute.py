"""tf.distribute for fine-tuning: the strategies of ``--strategy``, which process writes the run, and the one
line a lost cluster worker becomes."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator

from tlcli.errors import TlcliError, UsageError
from tlcli.train.recipes import STRATEGIES


def distribution(name: str):
    """Create the tf.distribute strategy ``name``; it must come before TensorFlow runs its first op.

    ``mirrored`` replicates the model on every local GPU (the CPU when there is none). ``multiworker``
    joins the cluster that the standard TF_CONFIG variable describes; every worker runs the same
    command and the chief (worker 0) writes the run.
    """
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    if name != "multiworker":
        raise UsageError(f"unknown --strategy {name!r}; use {' or '.join(STRATEGIES)}")
    try:
        config = json.loads(os.environ.get("TF_CONFIG") or "null")
        workers = config["cluster"]["worker"]
        task = (config["task"]["type"], int(config["task"]["index"]))
    except (ValueError, KeyError, TypeError):
        raise UsageError(
            "--strategy multiworker reads the cluster from TF_CONFIG, which is missing or not "
            '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}'
        ) from None
    if not isinstance(workers, list) or task[0] not in config["cluster"] or task[1] >= len(config["cluster"][task[0]]):
        raise UsageError(f"TF_CONFIG's task {task[0]} {task[1]} is not in its cluster {config['cluster']}")
    try:
        return tf.distribute.MultiWorkerMirroredStrategy()
    except RuntimeError as exc:
        raise UsageError(
            f"cannot join the TF_CONFIG cluster ({str(exc).splitlines()[0]}); create the multiworker strategy "
            "before TensorFlow runs any op"
        ) from None


def is_writer(strategy) -> bool:
    """True for the one process that saves the run: the chief of a multi-worker cluster, else this one."""
    return strategy is None or bool(strategy.extended.should_checkpoint)


def _lost_worker(exc: BaseException | None):
    """The TensorFlow error of a lost cluster worker behind ``exc``, or None: Keras re-raises an error in
    creating a layer's variables (a collective broadcast under a multi-worker strategy) as a TypeError."""
    import tensorflow as tf

    lost = (tf.errors.UnavailableError, tf.errors.AbortedError, tf.errors.DeadlineExceededError)
    while exc is not None and not isinstance(exc, lost):
        exc = exc.__cause__ or exc.__context__
    return exc


@contextlib.contextmanager
def cluster_failures() -> Iterator[None]:
    """Under a multi-worker strategy: a worker of the cluster that dies or stops answering aborts the collectives of the
    others (TensorFlow's coordination service notices the missing heartbeats): one line, nothing saved."""
    try:
        yield
    except Exception as raised:
        exc = _lost_worker(raised)
        if exc is None:
            raise
        lost = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", exc.message.split("aborted by:")[-1])))
        raise TlcliError(
            f"the cluster lost a worker during fine-tuning ({', '.join(lost) or exc.message.splitlines()[0]}); "
            "nothing was saved: start every worker of TF_CONFIG again with the same command"
        ) from None
