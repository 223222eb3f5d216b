"""Where things are in a table segment of given capacities, and what it is called.

Owns the offsets of the three row tables, of the group blocks and the order array
(one of each per instance slot at most), of the app summaries (one per app slot),
the total size, the expected static
header, and the versioned segment names. Pure arithmetic on codec constants:
no mmap, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from shm import codec

PAGE = 4096


def table_segment_name(base: str) -> str:
    """POSIX shm name of the table: "/<base>.v<LAYOUT_VERSION>" (old and new code coexist)."""
    return f"/{base.lstrip('/')}.v{codec.LAYOUT_VERSION}"


@dataclass(frozen=True, slots=True)
class Layout:
    """Offsets of every row of a table segment with these capacities."""

    max_nodes: int
    max_apps: int
    max_instances: int

    def __post_init__(self) -> None:
        for name in ("max_nodes", "max_apps", "max_instances"):
            if not 0 < getattr(self, name) <= 0xFFFFFFFF:
                raise ValueError(f"{name} must be 1..2**32-1, not {getattr(self, name)}")

    @property
    def nodes_at(self) -> int:
        return codec.HEADER_SIZE

    @property
    def apps_at(self) -> int:
        return self.nodes_at + self.max_nodes * codec.NODE_ROW

    @property
    def instances_at(self) -> int:
        return self.apps_at + self.max_apps * codec.APP_ROW

    @property
    def groups_at(self) -> int:
        """The group blocks: at most one group per instance."""
        return self.instances_at + self.max_instances * codec.INSTANCE_ROW

    @property
    def order_at(self) -> int:
        """The order array: one entry per instance."""
        return self.groups_at + self.max_instances * codec.HOT_SIZE

    @property
    def summaries_at(self) -> int:
        """The app summaries: one per app slot."""
        end = self.order_at + self.max_instances * codec.ORDER_ENTRY.size
        return (end + 7) // 8 * 8

    @property
    def total_size(self) -> int:
        end = self.summaries_at + self.max_apps * codec.summary_size(self.max_nodes)
        return (end + PAGE - 1) // PAGE * PAGE

    def node(self, index: int) -> int:
        """Offset of node slot `index`."""
        return self.nodes_at + index * codec.NODE_ROW

    def app(self, index: int) -> int:
        """Offset of app slot `index`."""
        return self.apps_at + index * codec.APP_ROW

    def instance(self, index: int) -> int:
        """Offset of instance slot `index`."""
        return self.instances_at + index * codec.INSTANCE_ROW

    def group(self, index: int) -> int:
        """Offset of group block `index`."""
        return self.groups_at + index * codec.HOT_SIZE

    def entry(self, index: int) -> int:
        """Offset of order array entry `index`."""
        return self.order_at + index * codec.ORDER_ENTRY.size

    def summary(self, app_slot: int) -> int:
        """Offset of app slot `app_slot`'s summary block (its bitmaps follow)."""
        return self.summaries_at + app_slot * codec.summary_size(self.max_nodes)

    def static(self) -> codec.Static:
        """The static header a segment of this layout carries."""
        return codec.Static(
            magic=codec.MAGIC,
            version=codec.LAYOUT_VERSION,
            header_size=codec.HEADER_SIZE,
            total_size=self.total_size,
            max_nodes=self.max_nodes,
            max_apps=self.max_apps,
            max_instances=self.max_instances,
            node_row=codec.NODE_ROW,
            app_row=codec.APP_ROW,
            instance_row=codec.INSTANCE_ROW,
        )
