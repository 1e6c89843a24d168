"""Progress bars for a run's phases outside the optimizer steps (evals, probe sampling, the forward-thread check,
adapter initialization, checkpoints), in the sweep's tqdm style, below the run's step bar.

A bar appears only once its phase has lasted DELAY seconds (short phases stay silent, as on the embedded model), and
is redrawn every second, so a phase inside one long library call still shows its elapsed time. Counts come from
forward hooks on the model's decoder: nothing in the measured code changes, and the hooks only count.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

DELAY = 3.0  # seconds


@contextmanager
def phase(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True, position: int = 2):
    """A tqdm bar for the block (or a disabled one); yields it."""
    from tqdm.auto import tqdm
    bar = tqdm(total=total, desc=desc, unit=unit, delay=DELAY, leave=False, disable=not enabled, position=position,
               dynamic_ncols=True)
    stop = threading.Event()

    def tick():
        while not stop.wait(1.0):
            if bar._time() - bar.start_t >= DELAY:  # tqdm's own delay rule, for a bar that is not being updated
                bar.refresh()
    ticker = threading.Thread(target=tick, daemon=True) if enabled else None
    if ticker is not None:
        ticker.start()
    try:
        yield bar
    finally:
        stop.set()
        if ticker is not None:
            ticker.join()
        bar.close()


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder()  # PEFT calls the causal LM's forward directly (no hooks); it calls its decoder


def _input_shape(args, kwargs):
    ids = kwargs.get("input_ids", args[0] if args else None)
    if ids is None:
        ids = kwargs.get("inputs_embeds")
    return (ids.shape[0], ids.shape[1]) if ids is not None else (0, 0)


@contextmanager
def count_prompts(model, bar):
    """Advance `bar` by a batch's rows once the next batch starts (a prefill: more than one new position per row),
    and by the last batch's rows at the end: finished prompts, for batched greedy decoding."""
    pending = [0]

    def hook(module, args, kwargs):
        rows, width = _input_shape(args, kwargs)
        if width > 1:
            bar.update(pending[0])
            pending[0] = rows
    handle = _decoder(model).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
    bar.update(pending[0])
    if bar.total is not None and bar.n < bar.total:  # e.g. memoized completions: no forward at all
        bar.update(bar.total - bar.n)


@contextmanager
def count_forwards(model, bar):
    """Advance `bar` by one per decoder forward (a decode step, in generation)."""
    def hook(module, args):
        bar.update(1)  # returns nothing: a pre-hook's return value would replace the forward's arguments (and
        #                tqdm's update returns True whenever it redraws)
    handle = _decoder(model).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
