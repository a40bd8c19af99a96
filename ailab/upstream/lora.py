"""LoRA adapters served by their base model's llama-server: the `lora` list every request
to such a base carries, the base's reload when a request names an adapter its process was
started without, and an adapter's state as /models shows it.

A base is started with all its adapters at scale 0 (``binaries.lora_args``); its
llama-server gives a request that sends no list every adapter at scale 1, so every
request sends the whole list, this adapter at 1 and every other at 0, and a previous
request's scales never carry over. The ids are the order the running process was started
with (``manager.model.adapters``), which may differ from the registry's current order
until the base restarts.
"""

from __future__ import annotations

import logging
from typing import Any

from ailab.config import AdapterFile, ModelSource
from ailab.errors import Unavailable
from ailab.upstream.pool import Instance, ModelPool

log = logging.getLogger("ailab.lora")


def _started(instance: Instance) -> tuple[AdapterFile, ...]:
    """The adapters the instance's process was started with."""
    running = instance.manager.model
    return running.adapters if running is not None else ()


def request_fields(instance: Instance, adapter: str | None) -> dict[str, Any]:
    """What a request to this instance adds to its body: the whole `lora` list (empty when
    the base has no adapters). Unavailable (503) if the process lacks the named adapter,
    which only happens when another request reloads the base meanwhile."""
    started = _started(instance)
    if adapter is not None and adapter not in {file.key for file in started}:
        raise Unavailable(
            f"{instance.key} is being reloaded to add the LoRA adapter {adapter!r}; try again"
        )
    if not started:
        return {}
    scales = [{"id": n, "scale": float(f.key == adapter)} for n, f in enumerate(started)]
    return {"lora": scales}


async def prepare(pool: ModelPool, source: ModelSource) -> None:
    """Before a request is admitted to a base: its next start gets the registry's current
    adapters, and a running process that lacks the named adapter (new, or its file
    changed) is unloaded once its requests are done, so the request loads it again with
    the adapter. Requests naming the base or a loaded adapter never reload it."""
    instance = pool.instance(source)
    if instance.source.adapters != source.adapters:
        instance.source = instance.source.model_copy(update={"adapters": source.adapters})
    if source.adapter is None or not instance.holds_memory or instance.reserved:
        return
    wanted = next(file for file in source.adapters if file.key == source.adapter)
    if wanted not in _started(instance):
        log.info("reloading %s to add the LoRA adapter %s", instance.key, wanted.key)
        await pool.unload(instance)


def adapter_state(instance: Instance | None, file: AdapterFile) -> tuple[str, str | None]:
    """An adapter's state: its base's while the base's process has it loaded, else
    unloaded (with what the first request naming it will do)."""
    if instance is None or not instance.holds_memory:
        return "unloaded", None
    if file in _started(instance):
        return instance.state, instance.manager.message
    return "unloaded", (
        f"{instance.key} runs without it; the first request naming it reloads {instance.key}"
    )
