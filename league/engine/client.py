"""EngineClient: the in-process engine's ``generate`` interface, against a league (or SGLang) server.

Prompts go out as token ids and outputs come back as ``GenerateOutput``s, so the RL loop does not care
whether the engine is in its process or behind HTTP. Standard library only (``urllib``); proxies from the
environment are not used. Not responsible for starting servers, retrying, or tokenization.
"""

import base64
import dataclasses
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from league.engine import weight_sync
from league.engine.request import GenerateOutput, SamplingParams, SpecStats


class EngineServerError(RuntimeError):
    """The server answered with an error; ``status`` is the HTTP status, ``message`` the server's words."""

    def __init__(self, status: int, message: str, url: str):
        super().__init__(f"{url}: HTTP {status}: {message}")
        self.status, self.message = status, message


class EngineClient:
    """A remote engine: ``generate`` sends one HTTP request per prompt, many in flight at once.

    Args:
        base_url (str): the server, e.g. ``http://127.0.0.1:30000``.
        timeout (float, Optional): seconds to wait for one answer (a whole generation). Default: 600.
        max_workers (int, Optional): requests one ``generate`` keeps in flight at once. Default: 256.
    """

    def __init__(self, base_url: str, timeout: float = 600.0, max_workers: int = 256):
        self.base_url, self.timeout, self.max_workers = base_url.rstrip("/"), timeout, max_workers
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        n: int = 1,
        routed_experts_start_len: int | None = None,
    ) -> list[GenerateOutput]:
        """Generate for every prompt (n samples each, consecutive in the result), as ``LLMEngine.generate``."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts")
        routes = {} if routed_experts_start_len is None else {"return_routed_experts": True}
        routes |= {"routed_experts_start_len": routed_experts_start_len} if routes else {}
        bodies = [
            {"input_ids": list(p), "sampling_params": _sampling_json(sp, n), "return_logprob": True} | routes
            for p, sp in zip(prompts, params_list)
        ]
        with ThreadPoolExecutor(max_workers=max(1, min(self.max_workers, len(bodies)))) as pool:
            answers = list(pool.map(lambda body: self._request("POST", "/generate", body), bodies))
        layers = self.model_info()["model_args"]["num_layers"] if routes else 1
        return [
            _output(result, prompt, routed_experts_start_len or 0, layers)
            for prompt, answer in zip(prompts, answers)
            for result in (answer if isinstance(answer, list) else [answer])
        ]

    def health(self) -> bool:
        """Whether the server answers ``/health`` with 200."""
        try:
            self._request("GET", "/health")
        except (EngineServerError, ConnectionError, TimeoutError):
            return False
        return True

    def wait_until_healthy(self, timeout: float) -> None:
        """Poll ``/health`` until it answers 200; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.health():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.base_url} did not become healthy within {timeout} s")
            time.sleep(0.1)

    def model_info(self) -> dict:
        return self._request("GET", "/get_model_info")

    def update_weights(
        self,
        named: Iterable[tuple[str, torch.Tensor]],
        version: str | None = None,
        bucket_bytes: int = weight_sync.BUCKET_BYTES,
    ) -> None:
        """Hand ``(name, tensor)`` pairs (Hugging Face or league names) to the server by reference, in flattened
        buckets (``/update_weights_from_tensor``: shared memory on the CPU, CUDA IPC on the GPU; the server must run
        on this machine); then, with ``version``, name the weights so."""
        for bucket in weight_sync.buckets(named, bucket_bytes):
            payload = weight_sync.serialize(weight_sync.flatten_bucket(bucket))
            body = {"serialized_named_tensors": [payload], "load_format": "flattened_bucket", "flush_cache": False}
            self._request("POST", "/update_weights_from_tensor", body)
        if version is not None:
            self.update_weight_version(version)

    def join_weight_group(
        self, master_address: str, master_port: int, backend: str = "gloo", group_name: str = "weight_update_group"
    ):
        """A broadcast group of this process (rank 0) and the server (rank 1), for :meth:`broadcast_weights`."""
        body = {"master_address": master_address, "master_port": master_port, "rank_offset": 1, "world_size": 2}
        body |= {"backend": backend, "group_name": group_name}
        with ThreadPoolExecutor(1) as pool:  # the server joins while this process hosts the store
            joined = pool.submit(self._request, "POST", "/init_weights_update_group", body)
            group = weight_sync.new_group(master_address, master_port, 0, 2, backend)
            joined.result()
        return group

    def broadcast_weights(
        self,
        group,
        named: Iterable[tuple[str, torch.Tensor]],
        version: str | None = None,
        group_name: str = "weight_update_group",
        bucket_bytes: int = weight_sync.BUCKET_BYTES,
    ) -> None:
        """Send ``(name, tensor)`` pairs to the server over a group of :meth:`join_weight_group`, in buckets
        (``/update_weights_from_distributed``: the metadata by HTTP, the tensors by broadcast)."""
        for bucket in weight_sync.buckets(named, bucket_bytes):
            body = {
                "names": [name for name, _ in bucket],
                "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
                "shapes": [list(t.shape) for _, t in bucket],
                "group_name": group_name,
                "flush_cache": False,
            }
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(self._request, "POST", "/update_weights_from_distributed", body)
                weight_sync.broadcast(group, [t.detach().contiguous() for _, t in bucket])
                answer.result()
        if version is not None:
            self.update_weight_version(version)

    def update_weight_version(self, version: str) -> dict:
        return self._request("POST", "/update_weight_version", {"new_version": version, "abort_all_requests": False})

    def update_weights_from_disk(self, path: str) -> dict:
        """Have the server load a Hugging Face checkpoint folder (between two engine steps)."""
        return self._request("POST", "/update_weights_from_disk", {"model_path": path})

    def abort(self, rid: str) -> int:
        """End a request now (its output so far goes to its caller); returns how many requests ended."""
        return (self._request("POST", "/abort_request", {"rid": rid}) or {}).get("num_aborted", 0)

    def abort_all(self) -> int:
        return (self._request("POST", "/abort_request", {"abort_all": True}) or {}).get("num_aborted", 0)

    def flush_cache(self) -> dict:
        return self._request("POST", "/flush_cache", {})

    def server_info(self) -> dict:
        """``/get_server_info``: the engine's options and state (``internal_states``: requests, prefix cache)."""
        return self._request("GET", "/get_server_info")

    def _request(self, method: str, path: str, body: dict | None = None) -> Any:
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            raise EngineServerError(e.code, _error_message(e.read()), url) from None
        except urllib.error.URLError as e:
            raise ConnectionError(f"{url}: {e.reason}") from None
        return json.loads(raw) if raw else None


def _sampling_json(params: SamplingParams, n: int) -> dict:
    return {f.name: getattr(params, f.name) for f in dataclasses.fields(SamplingParams)} | {"n": n}


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        return body["error"]["message"] if "error" in body else body.get("message", raw.decode())
    except (ValueError, TypeError, KeyError, AttributeError):
        return raw.decode(errors="replace")


def _output(result: dict, prompt: list[int], routes_start: int = 0, layers: int = 1) -> GenerateOutput:
    meta = result["meta_info"]
    verify_steps = meta.get("spec_verify_ct", 0)
    spec = SpecStats(
        draft_tokens=meta.get("spec_draft_token_num", 0),
        accepted_tokens=meta.get("spec_accept_token_num", 0),
        verify_steps=verify_steps,
        verified_output_tokens=round(meta.get("spec_accept_length", 0.0) * verify_steps),
    )
    return GenerateOutput(
        rid=meta["id"],
        prompt_ids=list(prompt),
        output_ids=result["output_ids"],
        output_logprobs=[entry[0] for entry in meta.get("output_token_logprobs", [])],
        finish_reason=meta["finish_reason"]["type"],
        text=result.get("text"),
        spec=spec,
        routed_experts=_routes(meta, len(prompt) + len(result["output_ids"]), routes_start, layers),
        cached_tokens=meta.get("cached_tokens", 0),
        num_retractions=meta.get("num_retractions", 0),
    )


def _routes(meta: dict, num_tokens: int, start: int, layers: int) -> torch.Tensor | None:
    """SGLang's base64 int32 routed experts as ``[rows, layers, top_k]`` (rows: positions ``start`` to the one
    before the last token)."""
    if "routed_experts" not in meta:
        return None
    flat = torch.frombuffer(bytearray(base64.b64decode(meta["routed_experts"])), dtype=torch.int32)
    rows = num_tokens - 1 - start
    return flat.view(rows, layers, -1) if rows > 0 else flat.view(0, layers, 0)
