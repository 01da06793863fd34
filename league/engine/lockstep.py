"""A served engine over several ranks: its leading rank (place 0) takes the requests and, before each call it makes
on its engine that changes the engine's state, sends that call to the engine's other ranks, which make it on theirs
(SGLang's scheduler hands its requests to its tensor-parallel ranks the same way). Every rank then runs the same
steps on the same requests, and their collectives (``parallel.inference``) meet.

A call travels as its pickled name and arguments over the engine's control group (gloo, which waits as long as the
server idles), the tensors among its arguments (a weight update's) over the engine's group on the device. Where
every rank has the inputs already (``league generate``, ``league bench``, the RL loop), the ranks make the same calls
without any of this.

Not responsible for the engine's layout (``parallel.inference``) or for HTTP (``server``).
"""

import functools
import io
import logging
import pickle

import torch
import torch.distributed as dist

from league.engine.engine import LLMEngine
from league.parallel.inference import EngineLayout

log = logging.getLogger(__name__)

CALLS = (
    "add_request",
    "step",
    "abort",
    "recover",
    "update_weights",
    "update_weights_from_disk",
    "release_memory",
    "resume_memory",
    "flush_cache",
)
"""The engine's methods that change its state: what the leading rank sends before making them."""

_STOP = "stop"


class LeadingEngine:
    """The leading rank's engine: reads go to ``engine``; each call of :data:`CALLS` is sent to the other ranks
    first. :meth:`close` lets the other ranks return from :func:`follow`."""

    def __init__(self, engine: LLMEngine, layout: EngineLayout):
        self.engine, self.layout = engine, layout

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def _call(self, name: str, *args, **kwargs):
        if name == "update_weights":  # an iterable of pairs: sent as a list
            args = (list(args[0]), *args[1:])
        send(self.layout, self.engine.device, (name, args, kwargs))
        return getattr(self.engine, name)(*args, **kwargs)

    def close(self) -> None:
        send(self.layout, self.engine.device, (_STOP, (), {}))


for _name in CALLS:
    setattr(LeadingEngine, _name, functools.partialmethod(LeadingEngine._call, _name))


def follow(engine: LLMEngine, layout: EngineLayout) -> None:
    """On a rank other than the leading one: make each call the leading rank sends, in order, until it closes. A
    call that raises here raised on the leading rank too (same engine state, same arguments): it is logged and the
    next call awaited."""
    while True:
        name, args, kwargs = receive(layout, engine.device)
        if name == _STOP:
            return
        try:
            getattr(engine, name)(*args, **kwargs)
        except Exception as e:  # the leading rank reports it to its caller
            log.debug("rank %d: %s raised %s", layout.rank, name, e)


def send(layout: EngineLayout, device: torch.device, call: tuple) -> None:
    """The leading rank's half of one call: its pickle (tensors left out) over the control group, then each tensor
    over the engine's group."""
    buffer, tensors = io.BytesIO(), []
    _TensorsApart(buffer, tensors).dump(call)
    dist.broadcast_object_list([buffer.getvalue()], group_src=0, group=layout.control_group)
    for tensor in tensors:
        dist.broadcast(tensor.detach().to(device).contiguous(), group_src=0, group=layout.group)


def receive(layout: EngineLayout, device: torch.device) -> tuple:
    """The other ranks' half of :func:`send`: the call, its tensors on ``device``."""
    box = [None]
    dist.broadcast_object_list(box, group_src=0, group=layout.control_group)
    return _TensorsReceived(io.BytesIO(box[0]), layout, device).load()


class _TensorsApart(pickle.Pickler):
    """Pickles an object with its tensors replaced by their shapes and dtypes (collected in ``tensors``)."""

    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return (tuple(obj.shape), str(obj.dtype).removeprefix("torch."))
        return None


class _TensorsReceived(pickle.Unpickler):
    """Unpickles what :class:`_TensorsApart` pickled (on the ranks of the same job), receiving each tensor from the
    leading rank in turn."""

    def __init__(self, file, layout: EngineLayout, device: torch.device):
        super().__init__(file)
        self.layout, self.device = layout, device

    def persistent_load(self, pid):
        shape, dtype = pid
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        dist.broadcast(tensor, group_src=0, group=self.layout.group)
        return tensor
