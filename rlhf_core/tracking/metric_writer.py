"""A run's metrics written by a background thread, so a training loop never waits on the store.

`put` only appends to a queue. The writer thread sends the queue every `every_calls` puts or
`every_s` seconds, in order, in batches of at most 1000, each batch one store call bounded in
time (`batch_sender`: no retry loop, a short timeout). When a call fails because the store
does not answer, the thread logs one warning, moves what it holds to the run's spool file
(`tracking.spool`: memory stays small however long the outage) and tries again every
`retry_s`; when the store answers it sends the spool first, then the queue, so the store
receives every metric in the order it was logged, and logs one line that it caught up.

`close(timeout_s)` sends what is left, waiting while the store takes batches and giving up
once none went through for `timeout_s`; what it could not send is in the spool when it
returns, for the next stage start to replay.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from rlhf_core.tracking.check import SERVER_SCHEMES, mask_uri, store_scheme
from rlhf_core.tracking.spool import MAX_BATCH, Spool, is_unreachable

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

log = logging.getLogger(__name__)

# One batch: connect and each read. A dead server refuses at once; this bounds a hung one,
# and leaves room for a busy server to store 1000 metrics (seconds on a loaded machine).
SEND_TIMEOUT_S = 20.0
RETRY_EVERY_S = 5.0

Sender = Callable[[str, Sequence["Metric"]], None]


def batch_sender(client: MlflowClient, uri: str, timeout_s: float = SEND_TIMEOUT_S) -> Sender:
    """send(run_id, metrics): one log_batch call. To a tracking server it is one HTTP request
    with no retries and `timeout_s` (MLflow's client would retry for minutes, and the writer
    retries anyway); to a database or a local store it is the client's own call."""

    def client_call(run_id: str, metrics: Sequence[Metric]) -> None:
        client.log_batch(run_id, metrics=list(metrics))

    if store_scheme(uri) not in SERVER_SCHEMES:
        return client_call

    from mlflow.protos.service_pb2 import LogBatch
    from mlflow.store.tracking.rest_store import RestStore
    from mlflow.utils.proto_json_utils import message_to_json
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    try:  # MLflow internals (3.x): the REST route and the client's own credentials
        endpoint, method = RestStore._METHOD_TO_INFO[LogBatch]
        host_creds = client._tracking_client.store.get_host_creds
    except (AttributeError, KeyError):  # another MLflow: its own call, retries and all
        log.debug("MLflow %s: metric batches go through MlflowClient.log_batch", uri)
        return client_call

    def send(run_id: str, metrics: Sequence[Metric]) -> None:
        body = message_to_json(LogBatch(run_id=run_id, metrics=[m.to_proto() for m in metrics]))
        response = http_request(
            host_creds(),
            endpoint,
            method,
            max_retries=0,
            backoff_factor=0,
            timeout=timeout_s,
            json=json.loads(body),
        )
        verify_rest_response(response, endpoint)

    return send


class MetricWriter:
    """Writes one run's metrics from a daemon thread (module docstring)."""

    def __init__(
        self,
        send: Sender,
        run_id: str,
        spool: Spool,
        uri: str,
        *,
        every_calls: int,
        every_s: float,
        retry_s: float = RETRY_EVERY_S,
    ) -> None:
        self._send = send
        self._run_id = run_id
        self._spool = spool
        self._store = mask_uri(uri)
        self._every_calls = every_calls
        self._every_s = every_s
        self._retry_s = retry_s
        self._queue: deque[Metric] = deque()
        self._calls = 0  # puts since the last send
        self._spool_sent = 0  # lines of the spool file already sent
        self._down_since: float | None = None  # monotonic time of the first failed send
        self._last_sent = 0.0  # monotonic time of the last batch the store took
        self._error = ""
        self._flush_wanted = False
        self._closing = False
        self._abandoned = False
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="mlflow-metric-writer", daemon=True)
        self._thread.start()

    @property
    def down(self) -> bool:
        """Whether the last send failed (the store did not answer)."""
        return self._down_since is not None

    @property
    def error(self) -> str:
        """The last failure, one line ('' when none)."""
        return self._error

    def put(self, metrics: Sequence[Metric]) -> None:
        """Queue metrics (never blocks on the store)."""
        with self._idle:
            self._queue.extend(metrics)
            self._calls += 1
            if self._calls >= self._every_calls:
                self._idle.notify_all()

    def flush(self, timeout_s: float) -> bool:
        """Send everything queued so far; wait while batches go through, and at most
        `timeout_s` after the last one that did (a slow store catching up on an outage is
        waited for, a silent one is not). True when all is sent."""
        started = time.monotonic()
        with self._idle:
            self._flush_wanted = True
            self._idle.notify_all()
            while self._pending() and not self._abandoned:
                left = max(started, self._last_sent) + timeout_s - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    break
                self._idle.wait(min(left, 0.5))
            return not self._pending()

    def close(self, timeout_s: float) -> bool:
        """Send what is left within `timeout_s`, then stop the thread. True when everything
        reached the store; else what was not sent is in the spool file."""
        sent = self.flush(timeout_s)
        with self._idle:
            self._closing = True
            self._abandoned = not sent
            leftover = list(self._queue)
            self._queue.clear()
            self._idle.notify_all()
        if leftover:  # the thread may still be inside a send: it keeps its hands off now
            self._spool.append_metrics(leftover)
        self._thread.join(timeout=1.0)
        return sent

    # ---------------------------------------------------------------------------------------
    # The writer thread

    def _pending(self) -> bool:
        return bool(self._queue) or self._spool_unsent()

    def _spool_unsent(self) -> bool:
        return self._spool.exists()

    def _run(self) -> None:
        while True:
            with self._idle:
                self._idle.wait_for(self._due, timeout=self._wait_s())
                if self._closing:
                    return
                self._flush_wanted = False
            self._send_all()
            with self._idle:
                self._idle.notify_all()  # wakes `flush`

    def _due(self) -> bool:
        if self._closing or self._flush_wanted:
            return True
        return not self.down and self._calls >= self._every_calls  # down: retry after retry_s

    def _wait_s(self) -> float:
        return self._retry_s if self.down else self._every_s

    def _send_all(self) -> None:
        """The spool's unsent lines, then the queue, in order; on a failure spill the queue
        to the spool and note the outage."""
        try:
            self._send_spool()
            while True:
                with self._idle:
                    batch = [self._queue[i] for i in range(min(MAX_BATCH, len(self._queue)))]
                    self._calls = 0
                if not batch:
                    break
                self._send(self._run_id, batch)
                with self._idle:
                    if self._abandoned:
                        return
                    for _ in batch:
                        self._queue.popleft()
                    self._sent()
        except Exception as error:  # any failure of the store: the metrics are kept (spool)
            self._went_down(error)
            return
        self._came_back()

    def _send_spool(self) -> None:
        if not self._spool.exists():
            return
        for number, metrics in self._spool.metric_lines(skip=self._spool_sent):
            self._send(self._run_id, metrics)
            self._spool_sent = number + 1
            with self._idle:
                self._sent()
        with self._idle:
            if self._abandoned:
                return
            self._spool.remove()
            self._spool_sent = 0

    def _sent(self) -> None:
        """A batch went through (call with the lock held): wakes `flush`."""
        self._last_sent = time.monotonic()
        self._idle.notify_all()

    def _went_down(self, error: Exception) -> None:
        with self._idle:
            if self._abandoned:
                return
            spilled = list(self._queue)
            self._queue.clear()
            self._spool.append_metrics(spilled)
        self._error = _one_line(error)
        if self._down_since is None:
            self._down_since = time.monotonic()
            reason = "does not answer" if is_unreachable(error) else f"failed: {self._error}"
            log.warning(
                "MLflow tracking store %s %s; training goes on, metrics are kept in %s and sent "
                "when it answers again.",
                self._store,
                reason,
                self._spool.path,
            )

    def _came_back(self) -> None:
        if self._down_since is not None:
            log.warning(
                "MLflow tracking store %s answers again after %.0f s; the metrics kept "
                "meanwhile were sent.",
                self._store,
                time.monotonic() - self._down_since,
            )
        self._down_since = None
        self._error = ""


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
