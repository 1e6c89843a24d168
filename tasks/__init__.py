"""Task registry: tasks register a factory by name; the harness looks them up with `get_task`."""
from __future__ import annotations

from collections.abc import Callable

from bench.errors import unknown_name
from tasks.base import CompletionBudget, Example, RewardConfig, Task, chat_prompt, plain_prompt  # noqa: F401

TASKS: dict[str, Callable[..., Task]] = {}
DESCRIPTIONS: dict[str, str] = {}


def register_task(name: str, description: str):
    def wrap(factory):
        TASKS[name] = factory
        DESCRIPTIONS[name] = description
        return factory
    return wrap


def get_task(name: str, **params) -> Task:
    if name not in TASKS:
        raise unknown_name("task", name, TASKS)
    return TASKS[name](**params)


from tasks import gsm8k, synth_gsm  # noqa: E402,F401  (register)
