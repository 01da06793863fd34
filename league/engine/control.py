"""The server's control routes, as SGLang names and shapes them: weight version, pause / continue, update windows,
weight updates (from disk, by tensor reference, by a broadcast group), release / resume of memory, server info.

The fields each body may have and pure checks of their values come first; ``ControlRoutes`` holds the handlers,
which the server's request handler inherits. Each carries out its request through the ``EngineWorker`` (between
two engine steps) and ``weight_sync``. Not responsible for /generate or the OpenAI routes (``server.py``).
"""

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from league.engine import protocol, weight_sync
from league.engine.model_runner import MEMORY_TAGS

log = logging.getLogger(__name__)

BASE_FIELDS = frozenset({"rid", "http_worker_ipc"})
"""Fields every SGLang control request may carry (routing within a server; nothing for league to do)."""
UPDATE_FIELDS = BASE_FIELDS | {"flush_cache", "abort_all_requests", "weight_version", "torch_empty_cache", "selector"}
DISK_UPDATE_FIELDS = UPDATE_FIELDS | {"model_path", "load_format", "is_async", "keep_pause", "recapture_cuda_graph"}
DISK_UPDATE_FIELDS |= {"token_step", "manifest"}
DISK_UPDATE_UNSUPPORTED = {
    "is_async": "a load between two engine steps (the default)",
    "manifest": "a checkpoint folder (`model_path`)",
    "token_step": "the weight version (`weight_version`)",
}
DISK_LOAD_FORMATS = (None, "auto", "safetensors")
"""``load_format`` of /update_weights_from_disk: league reads safetensors folders."""
TENSOR_UPDATE_FIELDS = UPDATE_FIELDS | {"serialized_named_tensors", "load_format", "disable_draft_model"}
DISTRIBUTED_UPDATE_FIELDS = UPDATE_FIELDS | {"names", "dtypes", "shapes", "group_name", "load_format"}
GROUP_FIELDS = BASE_FIELDS | {"master_address", "master_port", "rank_offset", "world_size", "group_name", "backend"}
PAUSE_MODES = ("abort", "retract", "in_place")
SELECTORS = (None, "all", "target")
"""Which weights an update window covers: league's MTP layer is part of the one model, so both name all of it."""


def version_field(body: dict, key: str) -> str | None:
    """A weight version (SGLang sends strings; miles' counters arrive as strings too; numbers are taken as text)."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"`{key}` must be a string, got {value!r:.80}")
    return str(value)


def check_selector(body: dict) -> None:
    if body.get("selector") not in SELECTORS:
        raise ValueError(f"`selector` must be one of {list(SELECTORS)}, got {body['selector']!r}")


def parse_tags(body: dict) -> set[str]:
    """The ``tags`` of a memory request: null (or none) means all of them."""
    unknown = sorted(set(body) - BASE_FIELDS - {"tags"})
    if unknown:
        raise ValueError(f"the body has unknown fields {unknown}; known fields: ['tags']")
    tags = body.get("tags")
    if tags is None:
        return set(MEMORY_TAGS)
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise ValueError(f"`tags` must be null or a list of {list(MEMORY_TAGS)}, got {tags!r:.80}")
    bad = [t for t in tags if t not in MEMORY_TAGS]
    if bad:
        raise ValueError(f"`tags` has {bad}; known tags: {list(MEMORY_TAGS)}")
    return set(tags)


@dataclass(kw_only=True, slots=True)
class GroupRequest:
    """An /init_weights_update_group request (SGLang's fields and defaults)."""

    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


def parse_group(body: dict[str, Any]) -> GroupRequest:
    for key, kind in (("master_address", str), ("master_port", int), ("rank_offset", int), ("world_size", int)):
        if not isinstance(body.get(key), kind) or isinstance(body.get(key), bool):
            raise ValueError(
                f"`{key}` must be {'a string' if kind is str else 'an integer'}, got {body.get(key)!r:.80}"
            )
    request = GroupRequest(
        master_address=body["master_address"],
        master_port=body["master_port"],
        rank_offset=body["rank_offset"],
        world_size=body["world_size"],
        group_name=body.get("group_name") or "weight_update_group",
        backend=body.get("backend") or "nccl",
    )
    if not 0 < request.master_port < 65536:
        raise ValueError(f"`master_port` must be in 1..65535, got {request.master_port}")
    if not 0 < request.rank_offset < request.world_size:
        raise ValueError(
            f"`rank_offset` must be in 1..world_size-1 (rank 0 is the trainer), got {request.rank_offset} "
            f"with world_size {request.world_size}"
        )
    return request


def league_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("league")
    except PackageNotFoundError:
        return "unknown"


def server_info(server) -> dict:
    """SGLang's /server_info: the engine's options (SGLang's names), the model's, and the engine's state."""
    engine, worker = server.engine, server.worker
    stats = engine.stats
    return {
        **dataclasses.asdict(engine.config),
        "model_path": server.model_path,
        "served_model_name": server.model_name,
        "context_length": engine.context_length,
        "device": str(engine.device),
        "weight_version": worker.weight_version,
        "version": league_version(),
        "internal_states": [
            {
                "num_running_requests": len(engine.scheduler.running),
                "num_waiting_requests": len(engine.scheduler.waiting),
                "avg_spec_accept_length": stats.spec.accept_length,
                "paused": sorted(worker.holds),
                "released_memory": sorted(engine.runner.released),
                "failed_steps": worker.num_failed_steps,
                **engine.cache_metrics(),
            }
        ],
    }


class ControlRoutes:
    """The control routes' handlers (a mixin of the server's ``JSONHandler``: ``self.server`` is the
    ``EngineServer``)."""

    server: Any

    def _update_weights(self, body: dict) -> None:
        """SGLang's /update_weights_from_disk: a Hugging Face checkpoint folder loaded between two engine steps."""
        protocol.check_fields(body, DISK_UPDATE_FIELDS, "the body")
        protocol.check_unsupported(body, DISK_UPDATE_UNSUPPORTED, "", {"token_step": 0})
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise ValueError(f"`model_path` must be a checkpoint folder, got {path!r}")
        if body.get("load_format") not in DISK_LOAD_FORMATS:
            raise ValueError(f"`load_format` must be one of {list(DISK_LOAD_FORMATS)}, got {body['load_format']!r}")
        version = version_field(body, "weight_version")
        try:
            in_flight = self.server.worker.update_weights(
                lambda engine: engine.update_weights_from_disk(path),
                protocol.flag(body, "abort_all_requests"),
                version or path,
            )
        except (ValueError, OSError) as e:
            self._send_error(400, f"model_path {path!r}: {e}", success=False, message=str(e))
            return
        message = f"loaded {path} between two engine steps; {in_flight} requests in flight go on with it"
        self._send_json(200, {"success": True, "message": message, "num_paused_requests": in_flight})

    def _update_weights_from_tensor(self, body: dict) -> None:
        """SGLang's /update_weights_from_tensor: tensors handed over by reference (shared memory on the CPU, CUDA IPC
        handles on the GPU), one serialized entry per engine rank (league's engine is one rank: entry 0)."""
        protocol.check_fields(body, TENSOR_UPDATE_FIELDS, "the body")
        entries = body.get("serialized_named_tensors")
        if not isinstance(entries, list) or not entries:
            raise ValueError("`serialized_named_tensors` must be a non-empty list (one base64 string per engine rank)")
        load_format = body.get("load_format")
        named = weight_sync.named_tensors(weight_sync.deserialize(entries[0]), load_format)
        self._apply_update(body, lambda engine: engine.update_weights(named), f"{len(named)} tensors")

    def _init_weights_update_group(self, body: dict) -> None:
        """SGLang's /init_weights_update_group: join a process group of the trainer (rank 0) and this engine
        (rank ``rank_offset``); returns once every rank has joined."""
        protocol.check_fields(body, GROUP_FIELDS, "the body")
        request = parse_group(body)
        if request.group_name in self.server.groups:
            raise ValueError(f"`group_name` {request.group_name!r} exists; destroy it first")
        try:
            group = weight_sync.new_group(
                request.master_address, request.master_port, request.rank_offset, request.world_size, request.backend
            )
        except (RuntimeError, OSError) as e:
            self._send_error(400, f"could not join the group: {e}", success=False, message=str(e))
            return
        self.server.groups[request.group_name] = group
        self._send_json(200, {"success": True, "message": f"joined {request.group_name} as rank {request.rank_offset}"})

    def _destroy_weights_update_group(self, body: dict) -> None:
        protocol.check_fields(body, {"group_name", "rid", "http_worker_ipc"}, "the body")
        name = body.get("group_name") or "weight_update_group"
        if self.server.groups.pop(name, None) is None:
            raise ValueError(
                f"`group_name` {name!r} is not a group of this server; known: {sorted(self.server.groups)}"
            )
        self._send_json(200, {"success": True, "message": f"left {name}"})

    def _update_weights_from_distributed(self, body: dict) -> None:
        """SGLang's /update_weights_from_distributed: receive the named tensors by broadcast from rank 0 of the
        group, then load them between two engine steps."""
        protocol.check_fields(body, DISTRIBUTED_UPDATE_FIELDS, "the body")
        name = body.get("group_name") or "weight_update_group"
        group = self.server.groups.get(name)
        if group is None:
            raise ValueError(f"`group_name` {name!r} is not a group of this server: call /init_weights_update_group")
        if body.get("load_format") not in (None, "direct"):
            raise ValueError(f"`load_format` must be null or 'direct' here, got {body['load_format']!r}")
        engine = self.server.engine
        named = weight_sync.receive(group, body.get("names"), body.get("dtypes"), body.get("shapes"), engine.device)
        self._apply_update(body, lambda engine: engine.update_weights(named), f"{len(named)} tensors")

    def _apply_update(self, body: dict, load: Callable, what: str) -> None:
        version = version_field(body, "weight_version")
        try:
            self.server.worker.update_weights(load, protocol.flag(body, "abort_all_requests"), version)
        except ValueError as e:
            self._send_error(400, f"the weight update failed: {e}", success=False, message=str(e))
            return
        message = f"loaded {what} between two engine steps" + (
            f". Weight version updated to {version}." if version else ""
        )
        self._send_json(200, {"success": True, "message": message})

    def _get_weight_version(self, body: dict) -> None:
        self._send_json(200, {"weight_version": self.server.worker.weight_version})

    def _update_weight_version(self, body: dict) -> None:
        protocol.check_fields(body, {"new_version", "abort_all_requests", "rid", "http_worker_ipc"}, "the body")
        version = version_field(body, "new_version")
        if version is None:
            raise ValueError("`new_version` is required: the version the current weights are to be called")
        worker = self.server.worker
        abort = protocol.flag(body, "abort_all_requests", True)
        worker.call(lambda: (abort and worker.abort_and_collect(), worker.set_weight_version(version)))
        self._send_json(
            200, {"success": True, "message": f"Weight version updated to {version}", "new_version": version}
        )

    def _pause_generation(self, body: dict) -> None:
        """SGLang's /pause_generation: ``abort`` ends the requests in flight (their outputs so far, finish reason
        abort); ``retract`` and ``in_place`` keep them where they are. Either way the engine takes no step, and
        new requests queue, until /continue_generation."""
        protocol.check_fields(body, {"mode", "rid", "http_worker_ipc"}, "the body")
        mode = body.get("mode") or "abort"
        if mode not in PAUSE_MODES:
            raise ValueError(f"`mode` must be one of {list(PAUSE_MODES)}, got {mode!r}")
        worker = self.server.worker
        worker.hold("pause", True)
        if mode == "abort":
            worker.call(worker.abort_and_collect)
        self._send_json(200, {"message": "Generation paused successfully.", "status": "ok"})

    def _continue_generation(self, body: dict) -> None:
        protocol.check_fields(body, {"torch_empty_cache", "rid", "http_worker_ipc"}, "the body")
        self.server.worker.hold("pause", False)
        self._send_json(200, {"message": "Generation continued successfully.", "status": "ok"})

    def _begin_weight_update(self, body: dict) -> None:
        """An update window: the engine takes no step until /end_weight_update (requests wait)."""
        protocol.check_fields(body, {"selector", "rid", "http_worker_ipc"}, "the body")
        check_selector(body)
        self.server.worker.hold("weight_update", True)
        self._send_json(200, {"success": True, "message": "weight update begun: the engine holds its steps"})

    def _end_weight_update(self, body: dict) -> None:
        protocol.check_fields(body, {"selector", "rid", "http_worker_ipc"}, "the body")
        self.server.worker.hold("weight_update", False)
        self._send_json(200, {"success": True, "message": "weight update ended"})

    def _release_memory(self, body: dict) -> None:
        """SGLang's /release_memory_occupation: free the cache slots, the weights (kept in host memory) and the
        captured graphs (``tags``; null: all), for a colocated trainer. Refused while requests are in flight."""
        tags = parse_tags(body)
        worker = self.server.worker

        def release() -> int:  # on the engine thread: no step runs between the release and the hold
            if worker.engine.has_unfinished():
                raise ValueError("requests are in flight: abort them (/pause_generation) or let them finish first")
            freed = worker.engine.release_memory(tags)
            worker.hold("released", True, wait=False)
            return freed

        freed = worker.call(release)
        log.info("released %s: %.1f MiB", sorted(tags), freed / 2**20)
        self._send_json(200, None)

    def _resume_memory(self, body: dict) -> None:
        tags = parse_tags(body)
        worker = self.server.worker

        def resume() -> None:  # on the engine thread: steps resume once nothing is released
            worker.engine.resume_memory(tags)
            if not worker.engine.runner.released:
                worker.hold("released", False)

        worker.call(resume)
        self._send_json(200, None)

    def _server_info(self, body: dict) -> None:
        self._send_json(200, server_info(self.server))


ROUTES = {
    ("GET", "/get_server_info"): ControlRoutes._server_info,
    ("GET", "/server_info"): ControlRoutes._server_info,
    ("GET", "/get_weight_version"): ControlRoutes._get_weight_version,
    ("GET", "/weight_version"): ControlRoutes._get_weight_version,
    ("POST", "/update_weight_version"): ControlRoutes._update_weight_version,
    ("POST", "/pause_generation"): ControlRoutes._pause_generation,
    ("POST", "/continue_generation"): ControlRoutes._continue_generation,
    ("POST", "/begin_weight_update"): ControlRoutes._begin_weight_update,
    ("POST", "/end_weight_update"): ControlRoutes._end_weight_update,
    ("POST", "/update_weights_from_disk"): ControlRoutes._update_weights,
    ("POST", "/update_weights_from_tensor"): ControlRoutes._update_weights_from_tensor,
    ("POST", "/init_weights_update_group"): ControlRoutes._init_weights_update_group,
    ("POST", "/destroy_weights_update_group"): ControlRoutes._destroy_weights_update_group,
    ("POST", "/update_weights_from_distributed"): ControlRoutes._update_weights_from_distributed,
    ("GET", "/release_memory_occupation"): ControlRoutes._release_memory,
    ("POST", "/release_memory_occupation"): ControlRoutes._release_memory,
    ("GET", "/resume_memory_occupation"): ControlRoutes._resume_memory,
    ("POST", "/resume_memory_occupation"): ControlRoutes._resume_memory,
}
