"""The prefix cache: a radix tree over token ids whose edges are whole blocks of KV, and whose nodes may hold a
snapshot of the Gated DeltaNet states at their end.

A prefix of a new request is reusable only up to a node that holds a snapshot: attention reads any cached keys, but a
GDN layer resumes only from its recurrent state at exactly that position. ``match`` returns the deepest such node
on the request's path (its blocks shared, its snapshot to copy into the request's slot), and also how far the keys
alone match, so that the request can snapshot its own states there (a branch point). Nodes hold references to their
blocks (``cache.BlockPool``) and own their snapshot slots; unreferenced leaves are evicted least recently used first.
Not responsible for copying states or blocks (the model runner) or for when snapshots are taken (the engine).

Legend: P positions per block (the page size).
"""

import heapq
import itertools
from dataclasses import dataclass, field

from league.engine.cache import BlockPool, SlotPool


@dataclass(eq=False, slots=True)
class Node:
    """Edge into this node: ``tokens`` (a multiple of P) kept in ``blocks`` (one per P tokens)."""

    tokens: tuple[int, ...] = ()
    blocks: list[int] = field(default_factory=list)
    parent: "Node | None" = None
    children: dict[tuple[int, ...], "Node"] = field(default_factory=dict)
    snapshot: int | None = None
    """A slot of the snapshot pool holding the GDN states after this node's last token."""
    last_use: int = 0
    depth: int = 0
    """Tokens from the root to this node's end."""


@dataclass(kw_only=True, slots=True)
class Match:
    """What a request can reuse: ``length`` tokens (a snapshot's position, 0 for none) in ``blocks``, resumed from
    ``snapshot``; ``keys_length``: how far the cached keys alone match (block-aligned, >= length)."""

    length: int = 0
    blocks: list[int] = field(default_factory=list)
    snapshot: int | None = None
    keys_length: int = 0


@dataclass(kw_only=True, slots=True)
class CacheStats:
    """Prefix-cache counters since the engine started (or since they were last read and reset)."""

    queries: int = 0
    """Requests matched against the cache (each admission, resumed ones included)."""
    hits: int = 0
    """Of those, requests that reused a cached prefix."""
    query_tokens: int = 0
    """Tokens those requests brought."""
    reused_tokens: int = 0
    """Tokens not computed again, found in the cache."""
    snapshots: int = 0
    """GDN state snapshots taken."""
    evicted_blocks: int = 0


class RadixCache:
    """Block-aligned token prefixes with their KV blocks and GDN snapshots.

    Args:
        page_size (int): P, tokens per block.
        blocks (BlockPool): the engine's blocks (this cache holds one reference to each block of its nodes).
        snapshots (SlotPool): slots of the snapshot pool (GDN states), each owned by at most one node.
    """

    def __init__(self, page_size: int, blocks: BlockPool, snapshots: SlotPool):
        self.page, self.blocks, self.snapshots = page_size, blocks, snapshots
        self.root = Node()
        self._clock = itertools.count(1)
        self.stats = CacheStats()

    def _key(self, tokens, at: int) -> tuple[int, ...]:
        return tuple(tokens[at : at + self.page])

    def match(self, tokens: list[int], limit: int) -> Match:
        """The longest reusable prefix of ``tokens`` no longer than ``limit`` tokens (see ``Match``); the nodes on the
        path are marked used."""
        node, depth, best = self.root, 0, Match()
        blocks: list[int] = []
        while depth + self.page <= limit:
            child = node.children.get(self._key(tokens, depth))
            if child is None:
                break
            same = self._same_blocks(child, tokens, depth, limit)
            blocks.extend(child.blocks[:same])
            depth += same * self.page
            child.last_use = next(self._clock)
            if same < len(child.blocks):
                break
            node = child
            if node.snapshot is not None:
                best = Match(length=depth, blocks=list(blocks), snapshot=node.snapshot)
        best.keys_length = depth
        return best

    def insert(self, tokens: list[int], blocks: list[int], snapshot: int | None) -> bool:
        """Cache ``tokens`` (a multiple of P) kept in ``blocks`` (a reference to each is taken where the tree lacks
        them) with the GDN states after them in the snapshot slot ``snapshot`` (owned by the tree from now on, or
        given back if the tree already has one there). Returns whether the snapshot was kept."""
        assert len(tokens) == len(blocks) * self.page
        node, depth = self.root, 0
        while depth < len(tokens):
            key = self._key(tokens, depth)
            child = node.children.get(key)
            if child is None:
                child = Node(tokens=tuple(tokens[depth:]), blocks=list(blocks[depth // self.page :]), parent=node)
                child.depth = len(tokens)
                for block in child.blocks:
                    self.blocks.share(block)
                node.children[key] = child
                node, depth = child, len(tokens)
                break
            same = self._same_blocks(child, tokens, depth, len(tokens))
            if same < len(child.blocks):
                child = self._split(child, same)
            node, depth = child, depth + same * self.page
        node.last_use = next(self._clock)
        if snapshot is None:
            return False
        if node.snapshot is not None or node is self.root:
            self.snapshots.release(snapshot)
            return False
        node.snapshot = snapshot
        self.stats.snapshots += 1
        return True

    def _same_blocks(self, child: Node, tokens: list[int], depth: int, limit: int) -> int:
        """How many whole blocks of ``child``'s edge equal ``tokens`` from ``depth`` on, within ``limit`` tokens."""
        same = 0
        while same < len(child.blocks) and depth + (same + 1) * self.page <= limit:
            at = same * self.page
            if child.tokens[at : at + self.page] != tuple(tokens[depth + at : depth + at + self.page]):
                break
            same += 1
        return same

    def _split(self, node: Node, blocks: int) -> Node:
        """Cut ``node``'s edge after ``blocks`` blocks; returns the new upper node (no snapshot: that stays below)."""
        cut = blocks * self.page
        upper = Node(tokens=node.tokens[:cut], blocks=node.blocks[:blocks], parent=node.parent, last_use=node.last_use)
        upper.depth = node.depth - len(node.tokens) + cut
        node.parent.children[node.tokens[: self.page]] = upper
        node.tokens, node.blocks, node.parent = node.tokens[cut:], node.blocks[blocks:], upper
        upper.children[node.tokens[: self.page]] = node
        return upper

    def evict(self, blocks: int = 0, snapshots: int = 0) -> None:
        """Drop least recently used leaves until ``blocks`` blocks and ``snapshots`` snapshot slots are free (or
        the tree is empty); a parent left without children is a leaf in its turn. A block also held by a running
        request is freed only when that request lets it go."""

        def short() -> bool:
            return self.blocks.num_free < blocks or self.snapshots.num_free < snapshots

        if not short():
            return
        leaves = [(n.last_use, id(n), n) for n in self._nodes() if not n.children and n is not self.root]
        heapq.heapify(leaves)
        while short() and leaves:
            leaf = heapq.heappop(leaves)[2]
            if leaf.children or leaf.parent is None or leaf.parent.children.get(leaf.tokens[: self.page]) is not leaf:
                continue  # no longer a leaf of the tree (merged into its child)
            parent = leaf.parent
            self._drop(leaf)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, (parent.last_use, id(parent), parent))

    def _drop(self, leaf: Node) -> None:
        for block in leaf.blocks:
            self.blocks.release(block)
        self.stats.evicted_blocks += len(leaf.blocks)
        if leaf.snapshot is not None:
            self.snapshots.release(leaf.snapshot)
        del leaf.parent.children[leaf.tokens[: self.page]]
        parent = leaf.parent
        # a parent left with one child and no snapshot of its own is merged into it (the tree stays a radix tree)
        if parent is not self.root and parent.snapshot is None and len(parent.children) == 1:
            (child,) = parent.children.values()
            child.tokens, child.blocks = parent.tokens + child.tokens, parent.blocks + child.blocks
            child.parent = parent.parent
            parent.parent.children[parent.tokens[: self.page]] = child
            parent.parent, parent.children = None, {}  # merged away

    def flush(self) -> None:
        """Drop everything (after a weight update, or on request)."""
        for node in self._nodes():
            if node is self.root:
                continue
            for block in node.blocks:
                self.blocks.release(block)
            if node.snapshot is not None:
                self.snapshots.release(node.snapshot)
        self.root = Node()

    def _nodes(self) -> list[Node]:
        out, stack = [], [self.root]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    @property
    def num_blocks(self) -> int:
        """Blocks the tree references."""
        return sum(len(n.blocks) for n in self._nodes())

    @property
    def num_snapshots(self) -> int:
        return sum(n.snapshot is not None for n in self._nodes())
