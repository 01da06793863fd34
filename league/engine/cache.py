"""The engine's caches: attention KV (trunk and MTP) and routed experts in blocks of ``page_size`` positions, found
through each slot's row of one block table (``models.qwen3_5_moe.Pages``); GDN conv windows ``[slots, C, W-1]``
and recurrent states ``[slots, Hv, K, V]`` (fp32) per slot, and verify scratch rows (see ``GDNCache``); the free
lists of slots and blocks.

A request owns one slot (its GDN states and its row of the block table) and the blocks its row lists; blocks are
reference-counted, so that requests and the prefix cache share them (``BlockPool``). Not responsible for deciding
which request gets which slot or block (``scheduler``), nor for the model's math.
"""

from dataclasses import dataclass, field

import torch

from league.models.qwen3_5_moe import AttentionCache, GDNCache, ModelArgs, ModelCache, Pages


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
    page_size: int | None = None,
    num_blocks: int | None = None,
) -> ModelCache:
    """Zeroed caches for ``num_slots`` requests of up to ``max_len`` tokens.

    Args:
        max_rows (int): batch rows with verify scratch (the most requests verified at once). Default: ``0``.
        max_steps (int): tokens per verify (speculative draft tokens + 1). Default: ``0``.
        state_dtype (torch.dtype): dtype of the GDN recurrent state. Default: ``torch.float32``.
        routes (bool): keep the experts each trunk layer chose at each position (int32
            ``[blocks, page, layers, top_k]``, each layer's cache holding its column). Default: ``False``.
        page_size (int, Optional): positions per block; with it, ``num_blocks`` blocks plus one scratch block (the
            last), and every slot's block table pointing at the scratch block until blocks are given to it.
            Default: one block of ``max_len`` positions per slot, block s for slot s (no table to fill).
        num_blocks (int, Optional): blocks, with ``page_size``. Default: enough for every slot's ``max_len``.
    """
    if page_size is None:
        pages, blocks = Pages.contiguous(num_slots, max_len, device), num_slots
    else:
        blocks_per_slot = -(-max_len // page_size)
        blocks = (num_blocks if num_blocks is not None else num_slots * blocks_per_slot) + 1
        table = torch.full((num_slots, blocks_per_slot), blocks - 1, dtype=torch.long, device=device)
        pages = Pages(table=table, size=page_size)

    def kv() -> AttentionCache:
        shape = (blocks, pages.size, args.num_kv_heads, args.head_dim)
        return AttentionCache(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            pages=pages,
        )

    def gdn() -> GDNCache:
        conv_shape = (args.gdn_conv_dim, args.linear_conv_kernel_dim - 1)
        ssm_shape = (args.linear_num_value_heads, args.linear_key_head_dim, args.linear_value_head_dim)
        cache = GDNCache(
            conv=torch.zeros((num_slots, *conv_shape), dtype=dtype, device=device),
            ssm=torch.zeros((num_slots, *ssm_shape), dtype=state_dtype, device=device),
            pages=pages,
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
        shape = (blocks, pages.size, len(layers), args.num_experts_per_tok)
        table = torch.full(shape, -1, dtype=torch.int32, device=device)
        for i, layer in enumerate(layers):
            layer.routes = table[:, :, i]
    return ModelCache(layers=layers, mtp_layers=[kv() for _ in range(args.mtp_num_layers)])


def pages_of(cache: ModelCache) -> Pages:
    """The block table and page size the cache's layers share."""
    return cache.layers[0].pages


def slot_rows(t: torch.Tensor, pages: Pages, slot: int, start: int, end: int) -> torch.Tensor:
    """Positions ``start:end`` of ``slot`` read out of a paged cache tensor ``t`` ``[blocks, page, ...]``."""
    positions = torch.arange(start, max(start, end), device=pages.table.device)
    return t.flatten(0, 1)[pages.rows(torch.full_like(positions, slot), positions)]


def routes_of(cache: ModelCache, slot: int, start: int, end: int) -> torch.Tensor:
    """The experts every trunk layer chose at positions ``start:end`` of ``slot``: int32 ``[end - start, layers,
    top_k]`` on the host."""
    pages = pages_of(cache)
    return torch.stack([slot_rows(layer.routes, pages, slot, start, end) for layer in cache.layers], dim=1).cpu()


def _item_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def state_bytes_per_slot(args: ModelArgs, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one slot's GDN conv windows and recurrent states (all GDN layers)."""
    num_gdn = sum(kind != "full_attention" for kind in args.layer_types)
    conv = args.gdn_conv_dim * (args.linear_conv_kernel_dim - 1) * _item_size(dtype)
    ssm = args.linear_num_value_heads * args.linear_key_head_dim * args.linear_value_head_dim
    return num_gdn * (conv + ssm * _item_size(state_dtype))


def kv_bytes_per_token(args: ModelArgs, dtype: torch.dtype, routes: bool = False) -> int:
    """Bytes one position takes in the paged caches: keys and values of every full-attention layer and MTP layer
    (with ``routes``, the experts every trunk layer chose)."""
    num_full = sum(kind == "full_attention" for kind in args.layer_types) + args.mtp_num_layers
    kv = 2 * args.num_kv_heads * args.head_dim * _item_size(dtype)
    routed = len(args.layer_types) * args.num_experts_per_tok * 4 if routes else 0
    return num_full * kv + routed


def cache_bytes_per_slot(
    args: ModelArgs, max_len: int, dtype: torch.dtype, state_dtype: torch.dtype = torch.float32, routes: bool = False
) -> int:
    """Bytes one request of ``max_len`` tokens takes (KV for ``max_len`` tokens, GDN conv window and state; with
    ``routes``, the experts chosen at each position)."""
    return max_len * kv_bytes_per_token(args, dtype, routes) + state_bytes_per_slot(args, dtype, state_dtype)


def copy_states(cache: ModelCache, src: int, dsts: list[int]) -> None:
    """Copy slot ``src``'s GDN conv windows and recurrent states into each slot of ``dsts``."""
    for layer in cache.layers:
        if isinstance(layer, GDNCache):
            index = torch.tensor(dsts, device=layer.ssm.device)
            layer.ssm[index] = layer.ssm[src].clone()
            layer.conv[index] = layer.conv[src].clone()


def copy_blocks(cache: ModelCache, src: list[int], dst: list[int]) -> None:
    """Copy whole blocks ``src[i]`` -> ``dst[i]`` of every paged cache (keys, values, routed experts)."""
    if not src:
        return
    for layer in [*cache.layers, *cache.mtp_layers]:
        tensors = [layer.k, layer.v] if isinstance(layer, AttentionCache) else []
        if layer.routes is not None:
            tensors.append(layer.routes)
        for t in tensors:
            s, d = torch.tensor(src, device=t.device), torch.tensor(dst, device=t.device)
            t[d] = t[s]


@dataclass(kw_only=True, slots=True)
class SlotPool:
    """A free list of cache slots."""

    num_slots: int
    first: int = 0
    """The first slot's index (the slots are ``first .. first + num_slots - 1``)."""
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.first + self.num_slots - 1, self.first - 1, -1))

    def allocate(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)

    @property
    def num_free(self) -> int:
        return len(self.free)


@dataclass(kw_only=True, slots=True)
class BlockPool:
    """Reference-counted cache blocks: a block is free when nothing (request or prefix cache) holds it."""

    num_blocks: int
    free: list[int] = field(default_factory=list)
    refs: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.free = list(range(self.num_blocks - 1, -1, -1))
        self.refs = [0] * self.num_blocks

    def allocate(self) -> int | None:
        if not self.free:
            return None
        block = self.free.pop()
        self.refs[block] = 1
        return block

    def share(self, block: int) -> None:
        self.refs[block] += 1

    def release(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0:
            self.free.append(block)

    @property
    def num_free(self) -> int:
        return len(self.free)
