"""The layers LoRA can wrap, to pick from: grouped by name (a table) or as the model's tree.

Both views show an :meth:`Inspection.as_dict` (:mod:`tunedeck.core.inspect`) and the set of
picked layer names; neither decides anything. Space, enter or a click on a row asks to
toggle its layers with :class:`Toggled`; the screen owns the pick and redraws the marks
with ``mark(picked)``. The tree is built lazily: a node's children are created when it is
first expanded, so an 80-layer model opens as fast as a 2-layer one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from rich.text import Text
from textual import events, on
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Tree
from textual.widgets.tree import TreeNode

from tunedeck.core.units import format_count


@dataclass
class Toggled(Message):
    """Pick these layers, or unpick them when all of them are picked."""

    layers: tuple[str, ...]


def mark(picked: int, total: int) -> Text:
    """■ all picked, ◩ some, □ none."""
    if total and picked == total:
        return Text("■", style="bold green")
    if picked:
        return Text("◩", style="bold yellow")
    return Text("□", style="dim")


def _size(n: int | None) -> str:
    return "mixed" if n is None else str(n)


class GroupTable(DataTable[Any]):
    """One row per group of layers (q_proj x 30): space, enter or a click toggles the group."""

    BINDINGS = [Binding("space", "toggle", "Pick", id="layers.toggle_group")]
    COLUMNS = ("", "group", "layers", "in", "out", "params", "type", "role")

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, id=id)
        self._groups: list[dict[str, Any]] = []

    def on_mount(self) -> None:
        for label in self.COLUMNS:
            self.add_column(label, key=label or "pick")

    def show(self, groups: list[dict[str, Any]], picked: Collection[str]) -> None:
        """Fill the table with ``groups`` (``Inspection.as_dict()["groups"]``)."""
        self.clear()
        self._groups = groups
        for index, g in enumerate(groups):
            self.add_row(self._mark(g, picked), Text(g["name"]), Text(str(g["count"]), justify="right"),
                         Text(_size(g["in_features"]), justify="right"),
                         Text(_size(g["out_features"]), justify="right"),
                         Text(format_count(g["params"]), justify="right"), Text(g["type"]), Text(g["role"]),
                         key=str(index))

    def mark(self, picked: Collection[str]) -> None:
        for index, g in enumerate(self._groups):
            self.update_cell(str(index), "pick", self._mark(g, picked))

    @staticmethod
    def _mark(group: dict[str, Any], picked: Collection[str]) -> Text:
        return mark(sum(name in picked for name in group["layers"]), group["count"])

    @property
    def highlighted_layers(self) -> tuple[str, ...]:
        if not self._groups or self.cursor_row < 0:
            return ()
        return tuple(self._groups[self.cursor_row]["layers"])

    def action_toggle(self) -> None:
        if self.highlighted_layers:
            self.post_message(Toggled(self.highlighted_layers))

    @on(DataTable.RowSelected)
    def _selected(self, event: DataTable.RowSelected) -> None:  # enter
        event.stop()
        self.action_toggle()

    def on_click(self, event: events.Click) -> None:
        """One click on a row toggles it (a checklist), rather than first highlighting it."""
        row = event.style.meta.get("row")
        if isinstance(row, int) and row >= 0 and self._groups:
            event.prevent_default()
            self.move_cursor(row=row)
            self.action_toggle()


class LayerTree(Tree[str]):
    """The model's modules down to each layer LoRA can wrap; a node's data is its name prefix.

    Space, enter or a click on a label toggles the node's layers (a branch: all under it);
    right and left (or a click on the arrow) expand and collapse.
    """

    BINDINGS = [
        Binding("space", "toggle", "Pick", id="layers.toggle_node"),
        Binding("right", "expand", "Expand", show=False, id="layers.expand"),
        Binding("left", "collapse", "Collapse", show=False, id="layers.collapse"),
    ]

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("model", id=id)
        self.auto_expand = False
        self.guide_depth = 3
        self._children: dict[str, list[str]] = {}
        self._under: dict[str, list[str]] = {}
        self._layers: dict[str, dict[str, Any]] = {}
        self._picked: Collection[str] = ()
        self._architecture = "model"

    def show(self, architecture: str, layers: list[dict[str, Any]], picked: Collection[str]) -> None:
        """Build the tree of ``layers`` (``Inspection.as_dict()["layers"]``), lazily."""
        self._children, self._under = {"": []}, {"": []}
        self._layers = {layer["name"]: layer for layer in layers}
        self._picked = picked
        for layer in layers:
            parts = layer["name"].split(".")
            self._under[""].append(layer["name"])
            for depth in range(1, len(parts) + 1):
                prefix, parent = ".".join(parts[:depth]), ".".join(parts[:depth - 1])
                if prefix not in self._under:
                    self._under[prefix] = []
                    self._children.setdefault(parent, []).append(prefix)
                self._under[prefix].append(layer["name"])
        self.clear()
        self.root.data = ""
        self._architecture = architecture
        self.root.set_label(self._label(self.root))
        node = self.root
        while True:  # open the way down to the repeated blocks (model -> layers)
            self.expand_node(node)
            branches = [child for child in node.children if child.allow_expand]
            if len(branches) != 1:
                break
            node = branches[0]
        self.move_cursor(self.root)

    def mark(self, picked: Collection[str]) -> None:
        """Redraw the marks of the nodes built so far."""
        self._picked = picked
        stack = [self.root]
        while stack:
            node = stack.pop()
            node.set_label(self._label(node))
            stack.extend(node.children)

    def _fill(self, node: TreeNode[str]) -> None:
        for prefix in self._children.get(node.data or "", []):
            if prefix in self._layers:
                node.add_leaf(self._label_for(prefix), data=prefix)
            else:
                node.add(self._label_for(prefix), data=prefix)

    def _label(self, node: TreeNode[str]) -> Text:
        return self._label_for(node.data or "")

    def _label_for(self, prefix: str) -> Text:
        under = self._under.get(prefix, [])
        picked = sum(name in self._picked for name in under)
        label = Text.assemble(mark(picked, len(under)), " ")
        layer = self._layers.get(prefix)
        if not prefix:
            label.append(self._architecture, style="bold")
            label.append(f"  {picked}/{len(under)} layers", style="dim")
        elif layer is not None:
            label.append(prefix.rsplit(".", 1)[-1])
            label.append(f"  {layer['in_features']} → {layer['out_features']}  {format_count(layer['params'])}"
                         f"  {layer['type']}", style="dim")
        else:
            label.append(prefix.rsplit(".", 1)[-1])
            label.append(f"  {picked}/{len(under)}", style="dim")
        return label

    def layers_of(self, node: TreeNode[str]) -> tuple[str, ...]:
        return tuple(self._under.get(node.data or "", ()))

    def node_for(self, prefix: str) -> TreeNode[str] | None:
        """The node of ``prefix`` (a module name), expanding the way to it."""
        node = self.root
        parts = prefix.split(".")
        for depth in range(1, len(parts) + 1):
            want = ".".join(parts[:depth])
            self.expand_node(node)
            match = next((child for child in node.children if child.data == want), None)
            if match is None:
                return None
            node = match
        return node

    @on(Tree.NodeExpanded)
    def _expanded(self, event: Tree.NodeExpanded[str]) -> None:
        if event.node.allow_expand and not event.node.children:
            self._fill(event.node)

    def expand_node(self, node: TreeNode[str]) -> None:
        if not node.children:
            self._fill(node)
        node.expand()

    @on(Tree.NodeSelected)
    def _selected(self, event: Tree.NodeSelected[str]) -> None:  # enter or a click on the label
        event.stop()
        self._toggle(event.node)

    def action_toggle(self) -> None:
        if self.cursor_node is not None:
            self._toggle(self.cursor_node)

    def _toggle(self, node: TreeNode[str]) -> None:
        layers = self.layers_of(node)
        if layers:
            self.post_message(Toggled(layers))

    def action_expand(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and not node.is_expanded:
            self.expand_node(node)
        elif node.children:
            self.move_cursor(node.children[0])

    def action_collapse(self) -> None:
        node = self.cursor_node
        if node is None:
            return
        if node.allow_expand and node.is_expanded:
            node.collapse()
        elif node.parent is not None:
            self.move_cursor(node.parent)

