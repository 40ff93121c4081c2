"""YAML that refuses duplicate keys.

PyYAML's SafeLoader silently keeps the last of two equal keys, so a second `mini:`
alias could replace a paid one with a free one unnoticed. This loader checks every
mapping while it is constructed and names the file, line and key path.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode

from proxy.errors import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader whose mappings raise on a key seen twice."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        self._check_unique(node)
        return super().construct_mapping(node, deep=deep)

    def _check_unique(self, node: MappingNode) -> None:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<:` merges are resolved by flatten_mapping, not keys
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # SafeLoader reports unhashable keys itself
            line = key_node.start_mark.line + 1
            if key in seen:
                path = ".".join([*_path_to(self._root, node), str(key)])
                raise ConfigError(
                    f"line {line}: {path}: duplicate key {key!r} (first at line {seen[key]})"
                )
            seen[key] = line

    def get_single_node(self) -> Node | None:
        self._root: Node | None = super().get_single_node()
        return self._root


def _path_to(root: Node | None, target: Node) -> list[str]:
    """The key path of `target` under `root` (list items as [i])."""
    if root is None:
        return []
    stack: list[tuple[Node, list[str]]] = [(root, [])]
    while stack:
        node, path = stack.pop()
        if node is target:
            return path
        if isinstance(node, MappingNode):
            for key_node, value_node in node.value:
                label = key_node.value if isinstance(key_node, ScalarNode) else "?"
                stack.append((value_node, [*path, str(label)]))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                prefix = [*path[:-1], f"{path[-1]}[{i}]"] if path else [f"[{i}]"]
                stack.append((item, prefix))
    return []


def load_yaml(text: str) -> Any:
    """Parse one YAML document like yaml.safe_load, refusing duplicate keys."""
    return yaml.load(text, Loader=_UniqueKeyLoader)
