"""Continual learning with adapters: one frozen adapter per task, routing without a task id.

    from adapterkit import continual
    learner = continual.Learner(am, method=ak.LoRA(r=4, targets=["conv2", "conv3"]))
    for task in continual.split_mnist():
        learner.learn(task)
    learner.predict(images)              # no task id: each input is routed to an adapter
"""

from .baselines import SharedLearner
from .data import ContinualError, Split, Task, TaskStream, split_mnist, tensor_encoder, text_encoder
from .learner import Learner
from .metrics import plot_matrix, summarize

__all__ = [
    "ContinualError", "Learner", "SharedLearner", "Split", "Task", "TaskStream", "plot_matrix", "split_mnist",
    "summarize", "tensor_encoder", "text_encoder",
]
