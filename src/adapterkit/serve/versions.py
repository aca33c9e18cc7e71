"""What each adapter version served: requests, errors, latency, labels, tokens, and feedback on answers.

The facts an A/B rollout is judged by (`POST /v1/adapters/{name}/split`): the engine records every
answered or failed request of a single adapter under its version, in Prometheus (labelled by
tenant, adapter and version) and in a JSON summary per adapter. An answer carries a request id;
`feedback(request_id, label=... | score=...)` later says whether it was right, giving per-version
accuracy. The ids of the newest `max_answers` answers are kept (older feedback is refused).
"""

from __future__ import annotations

import math
import statistics
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter

from .cache import AdapterKey
from .errors import BadRequest, NotFound
from .metrics import LATENCY_BUCKETS

LATENCIES_KEPT = 2048


@dataclass
class VersionFacts:
    requests: int = 0
    errors: int = 0
    latencies: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCIES_KEPT))
    labels: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    feedback: int = 0
    correct: int = 0
    scores: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else None

        labelled = self.feedback - len(self.scores)
        return {"requests": self.requests, "errors": self.errors,
                "latency_seconds": {"p50": quantile(0.5), "p90": quantile(0.9), "p99": quantile(0.99)},
                "labels": dict(self.labels), "tokens": self.tokens, "feedback": self.feedback,
                "accuracy": self.correct / labelled if labelled else None,
                "mean_score": statistics.fmean(self.scores) if self.scores else None}


@dataclass
class _Answer:
    key: AdapterKey
    labels: list[str] | None


class VersionStats:
    def __init__(self, registry: CollectorRegistry, max_answers: int = 100_000) -> None:
        self._lock = threading.Lock()
        self._facts: dict[AdapterKey, VersionFacts] = {}
        self._answers: OrderedDict[str, _Answer] = OrderedDict()
        self.max_answers = max_answers
        labels = ["tenant", "adapter", "version"]
        self.requests = PromCounter("adapterkit_version_requests", "Requests answered by an adapter version, by outcome",
                                    [*labels, "outcome"], registry=registry)
        self.latency = Histogram("adapterkit_version_latency_seconds", "Request latency by adapter version", labels,
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.labels = PromCounter("adapterkit_version_labels", "Labels an adapter version answered (classify)",
                                  [*labels, "label"], registry=registry)
        self.tokens = PromCounter("adapterkit_version_tokens", "Tokens an adapter version generated", labels,
                                  registry=registry)
        self.feedback = PromCounter("adapterkit_version_feedback", "Feedback on an adapter version's answers",
                                    [*labels, "result"], registry=registry)

    def _facts_of(self, key: AdapterKey) -> VersionFacts:
        return self._facts.setdefault(key, VersionFacts())

    def answered(self, key: AdapterKey, request_id: str, seconds: float, response: dict[str, Any]) -> None:
        names = (key.tenant, key.name, str(key.version))
        labels = [r["label"] for r in response.get("results", []) if isinstance(r, dict) and "label" in r]
        tokens = int(response.get("tokens", 0) or 0)
        with self._lock:
            facts = self._facts_of(key)
            facts.requests += 1
            facts.latencies.append(seconds)
            facts.labels.update(labels)
            facts.tokens += tokens
            self._answers[request_id] = _Answer(key, labels or None)
            while len(self._answers) > self.max_answers:
                self._answers.popitem(last=False)
        self.requests.labels(*names, "ok").inc()
        self.latency.labels(*names).observe(seconds)
        for label in labels:
            self.labels.labels(*names, label).inc()
        if tokens:
            self.tokens.labels(*names).inc(tokens)

    def failed(self, key: AdapterKey) -> None:
        with self._lock:
            self._facts_of(key).errors += 1
        self.requests.labels(key.tenant, key.name, str(key.version), "error").inc()

    def record_feedback(self, tenant: str, request_id: str, label: str | None = None, score: float | None = None,
                        index: int = 0) -> dict[str, Any]:
        """Whether the answer to `request_id` (its input `index`) was `label`, or how good it was (`score`)."""
        if (label is None) == (score is None):
            raise BadRequest("feedback gives a label or a score, one of them")
        if score is not None and not (isinstance(score, int | float) and math.isfinite(score)):
            raise BadRequest(f"score must be a finite number, not {score!r}")
        with self._lock:
            answer = self._answers.get(request_id)
            if answer is None or answer.key.tenant != tenant:
                raise NotFound(f"no answer with request id {request_id!r} (feedback is kept for the newest "
                               f"{self.max_answers} answers of your adapters)")
            facts = self._facts_of(answer.key)
            result: str
            if label is not None:
                if not answer.labels:
                    raise BadRequest("that answer has no label to compare with; give a score instead")
                if not 0 <= index < len(answer.labels):
                    raise BadRequest(f"index {index}: that request had {len(answer.labels)} inputs")
                result = "correct" if answer.labels[index] == label else "wrong"
                facts.correct += result == "correct"
            else:
                result = "scored"
                facts.scores.append(float(score))  # type: ignore[arg-type]
            facts.feedback += 1
        self.feedback.labels(answer.key.tenant, answer.key.name, str(answer.key.version), result).inc()
        return {"request_id": request_id, "adapter": answer.key.name, "version": answer.key.version, "result": result}

    def summary(self, tenant: str, name: str) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {k.version: f.summary() for k, f in sorted(self._facts.items())
                    if k.tenant == tenant and k.name == name}
