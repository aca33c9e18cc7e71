"""A Grid whose waits for nodes are bounded: Flower's node sampling waits for ever for the fewest
nodes a round needs (a SuperLink that lost a SuperNode keeps logging "Waiting for nodes to
connect"); this one lets it wait `wait` seconds, then stops the run with a clear reason.

It also waits for replies itself: a deployment's grid polls the SuperLink every 3 s, so each round
lost up to 3 s after its last reply had arrived; this one polls after 10 ms, backing off to 0.25 s."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from .tasks import FederatedError

if TYPE_CHECKING:
    from flwr.common.typing import Run


FIRST_POLL, LAST_POLL = 0.01, 0.25  # seconds between pulls for replies


class TooFewNodes(FederatedError):
    """Fewer nodes than a round needs stayed connected for longer than the run may wait."""


class BoundedGrid(Grid):
    """`inner`, except that `get_node_ids` raises TooFewNodes once fewer than `need` nodes have been
    connected for `wait` seconds in a row (any call with enough nodes starts the count again)."""

    def __init__(self, inner: Grid, need: int, wait: float) -> None:
        self.inner, self.need, self.wait = inner, need, wait
        self._short_since: float | None = None

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(self.inner.get_node_ids())
        if len(nodes) >= self.need:
            self._short_since = None
            return nodes
        now = time.monotonic()
        if self._short_since is None:
            self._short_since = now
        elif now - self._short_since > self.wait:
            raise TooFewNodes(f"{len(nodes)} node(s) connected, fewer than the {self.need} a round needs "
                              f"(min_available), for {self.wait:g} s")
        return nodes

    # --- the rest is the inner grid's ------------------------------------------------------------

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.inner.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return exchange(self.inner, messages, timeout)[0]


def exchange(grid: Grid, messages: Iterable[Message], timeout: float | None) -> tuple[list[Message], set[str]]:
    """Push `messages` on `grid`, then pull until every one has its reply or `timeout` seconds have
    passed; returns the replies and the ids of the messages still unanswered."""
    waiting = {i for i in grid.push_messages(messages) if i}  # a message that was not pushed has no id
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    pause = FIRST_POLL
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies += got
        waiting -= {msg.metadata.reply_to_message_id for msg in got}
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(pause if deadline is None else max(0.0, min(pause, deadline - time.monotonic())))
        pause = min(LAST_POLL, pause * 1.5)
    return replies, waiting
