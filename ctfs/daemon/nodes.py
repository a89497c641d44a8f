"""The mount's node table: one kernel node id per file version, so that each version has its own page cache.

The kernel caches a file's pages per node id. Giving a changed source file a new node id (its path plus its
FileIdentity) means a reader still holding the old version keeps reading the old version's pages, while an
open after the change looks the name up again and meets a new node with an empty cache. Directories keep one
node per path. A node lives while the kernel holds lookups of it (FUSE forget counts them down).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ctfs.daemon.lowlevel import ROOT_INO
from ctfs.daemon.source import Entry, Kind


@dataclass
class Node:
    ino: int
    path: str  # inside the mount: "/", "/llama/model.safetensors"
    entry: Entry
    lookups: int = 0

    @property
    def key(self) -> tuple:
        return (self.path, None if self.entry.kind is Kind.DIRECTORY else self.entry.identity)


class NodeTable:
    def __init__(self, root: Entry):
        self._nodes = {ROOT_INO: Node(ROOT_INO, "/", root, 1)}
        self._by_key = {self._nodes[ROOT_INO].key: ROOT_INO}
        self._next_ino = ROOT_INO + 1  # never reused: a node id names one version for the mount's life
        self._mutex = threading.Lock()

    def __getitem__(self, ino: int) -> Node:
        with self._mutex:
            return self._nodes[ino]

    def looked_up(self, path: str, entry: Entry) -> Node:
        """The node of `entry` at `path`, counting one more kernel lookup of it."""
        with self._mutex:
            ino = self._by_key.get(Node(0, path, entry).key)
            if ino is None:
                ino, self._next_ino = self._next_ino, self._next_ino + 1
                node = self._nodes[ino] = Node(ino, path, entry)
                self._by_key[node.key] = ino
            node = self._nodes[ino]
            node.entry = entry  # a directory's attributes change over its life
            node.lookups += 1
            return node

    def find(self, path: str, entry: Entry) -> Node | None:
        """The node of `entry` at `path` if the kernel has it, counting no lookup."""
        with self._mutex:
            ino = self._by_key.get(Node(0, path, entry).key)
            return None if ino is None else self._nodes[ino]

    def forget(self, ino: int, count: int) -> Node | None:
        """Count down the kernel's lookups of `ino`; the node when that was the last and it is gone."""
        with self._mutex:
            node = self._nodes.get(ino)
            if node is None or ino == ROOT_INO:
                return None
            node.lookups -= count
            if node.lookups <= 0:
                del self._nodes[ino]
                del self._by_key[node.key]
                return node
            return None

    def __len__(self) -> int:
        with self._mutex:
            return len(self._nodes)
