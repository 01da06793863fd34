"""Cache slots for the engine: preallocated per-layer tensors indexed by slot.

A request owns one slot: full-attention KV ``[slots, max_len, G, K]`` per layer (trunk and MTP), GDN conv
window ``[slots, C, W-1]`` and recurrent state ``[slots, Hv, K, V]`` (fp32) per GDN layer, and verify
scratch rows for the per-step conv windows and the recurrence's inputs (see ``GDNCache``). Not responsible for
deciding which request gets which slot beyond a free list, nor for the model's math.
"""

from dataclasses import dataclass, field

import torch

from league.models.qwen3_5_moe import AttentionCache, GDNCache, ModelArgs, ModelCache


def allocate_cache(
    args: ModelArgs,
    num_slots: int,
    max_len: int,
    dtype: torch.dtype,
    device: torch.device | str,
    max_rows: int = 0,
    max_steps: int = 0,
    state_dtype: torch.dtype = torch.float32,
    routes: bool = False,
) -> ModelCache:
    """Zeroed caches for ``num_slots`` requests of up to ``max_len`` tokens.

    Args:
        max_rows (int): batch rows with verify scratch (the most requests verified at once). Default: ``0``.
        max_steps (int): tokens per verify (speculative draft tokens + 1). Default: ``0``.
        state_dtype (torch.dtype): dtype of the GDN recurrent state. Default: ``torch.float32``.
        routes (bool): keep the experts each trunk layer chose at each position (int32
            ``[slots, max_len, layers, top_k]``, each layer's cache holding its column). Default: ``False``.
    """

    def kv() -> AttentionCache:
        shape = (num_slots, max_len, args.num_kv_heads, args.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, dtype=dtype, device=device), v=torch.zeros(shape, dtype=dtype, device=device)
        )

    def gdn() -> GDNCache:
        conv_shape = (args.gdn_conv_dim, args.linear_conv_kernel_dim - 1)
        ssm_shape = (args.linear_num_value_heads, args.linear_key_head_dim, args.linear_value_head_dim)
        cache = GDNCache(
            conv=torch.zeros((num_slots, *conv_shape), dtype=dtype, device=device),
            ssm=torch.zeros((num_slots, *ssm_shape), dtype=state_dtype, device=device),
        )
        if max_rows > 0 and max_steps > 0:

            def scratch(*shape: int) -> torch.Tensor:
                return torch.zeros((max_rows, max_steps, *shape), dtype=dtype, device=device)

            cache.conv_steps = scratch(*conv_shape)
            cache.verify_mixed = scratch(args.gdn_conv_dim)
            cache.verify_a = scratch(args.linear_num_value_heads)
            cache.verify_b = scratch(args.linear_num_value_heads)
        return cache

    layers = [kv() if kind == "full_attention" else gdn() for kind in args.layer_types]
    if routes:
        shape = (num_slots, max_len, len(layers), args.num_experts_per_tok)
        table = torch.full(shape, -1, dtype=torch.int32, device=device)
        for i, layer in enumerate(layers):
            layer.routes = table[:, :, i]
    return ModelCache(layers=layers, mtp_layers=[kv() for _ in range(args.mtp_num_layers)])


def routes_of(cache: ModelCache, slot: int, start: int, end: int) -> torch.Tensor:
    """The experts every trunk layer chose at positions ``start:end`` of ``slot``: int32 ``[end - start, layers,
    top_k]`` on the host."""
    end = max(start, end)
    return torch.stack([layer.routes[slot, start:end] for layer in cache.layers], dim=1).cpu()


def cache_bytes_per_slot(
    args: ModelArgs, max_len: int, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, routes: bool = False
) -> int:
    """Bytes one slot takes (KV for ``max_len`` tokens, GDN conv window and state; with ``routes``, the experts
    chosen at each position)."""
    item, state_item = torch.empty(0, dtype=dtype).element_size(), torch.empty(0, dtype=state_dtype).element_size()
    num_full = sum(kind == "full_attention" for kind in args.layer_types) + args.mtp_num_layers
    num_gdn = len(args.layer_types) - sum(kind == "full_attention" for kind in args.layer_types)
    kv = 2 * max_len * args.num_kv_heads * args.head_dim * item
    conv = args.gdn_conv_dim * (args.linear_conv_kernel_dim - 1) * item
    ssm = args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim * state_item
    routed = max_len * len(args.layer_types) * args.num_experts_per_tok * 4 if routes else 0
    return num_full * kv + num_gdn * (conv + ssm) + routed


def copy_slot(cache: ModelCache, src: int, dsts: list[int], length: int) -> None:
    """Copy slot ``src``'s first ``length`` cached tokens and states into each slot of ``dsts`` (n samples)."""
    index = torch.tensor(dsts)
    for layer in [*cache.layers, *cache.mtp_layers]:
        if isinstance(layer, GDNCache):
            layer.ssm[index.to(layer.ssm.device)] = layer.ssm[src].clone()
            layer.conv[index.to(layer.conv.device)] = layer.conv[src].clone()
        else:
            layer.k[index.to(layer.k.device), :length] = layer.k[src, :length].clone()
            layer.v[index.to(layer.v.device), :length] = layer.v[src, :length].clone()
        if layer.routes is not None:
            layer.routes[index.to(layer.routes.device), :length] = layer.routes[src, :length].clone()


@dataclass(kw_only=True, slots=True)
class SlotPool:
    """A free list of cache slots."""

    num_slots: int
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_slots - 1, -1, -1))

    def allocate(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self.free)
