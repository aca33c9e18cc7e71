"""What a base model is used for, spelt one way everywhere (the CLI's `--task`, the trainer, the server)."""

from __future__ import annotations

from enum import Enum


class Task(str, Enum):
    """A str enum: `Task.CAUSAL_LM == "causal-lm"`, and JSON writes its value."""

    CLASSIFY = "classify"  # a sequence-classification head: classify (and embed)
    CAUSAL_LM = "causal-lm"  # a language-model head: generate (and embed)
    ENCODE = "encode"  # no head: embed only

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: str | Task) -> Task:
        """A task from its name ("causal_lm" is read as "causal-lm"); ValueError naming the choices."""
        try:
            return cls(str(value).replace("_", "-"))
        except ValueError:
            raise ValueError(f"task {value!r}: one of {', '.join(t.value for t in cls)}") from None
