"""Write the shipped workflows from tools/workflow_sources.py in both formats.

    python -m tools.make_workflows            # (re)write workflows/api/*.json and workflows/*.json
    python -m tools.make_workflows --check    # exit 1 if the files on disk differ from what would be written

The API graphs are the source of truth. The UI form (what the frontend loads and saves: nodes,
links, widgets_values) is derived from them with the node definitions of a real ComfyUI host, so
widget order and count are exactly what the frontend expects for each node type.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
from pathlib import Path

from tools.workflow_sources import WORKFLOWS as SOURCES

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_GAP = 420, 40
SAMPLER, PRESETS_KEY = "SD35FP8Sampler", "sd35_fp8_presets"


def node_definitions(class_mappings: dict) -> dict[str, dict]:
    """class_type -> {"inputs": [(name, type, options)], "outputs": [(type, name)], "output_node": bool}."""
    defs = {}
    for class_type, cls in class_mappings.items():
        try:
            spec = cls.INPUT_TYPES()
        except Exception:  # a broken built-in node must not stop the generator
            continue
        inputs = []
        for section in ("required", "optional"):
            for name, value in (spec.get(section) or {}).items():
                kind = value[0]
                options = value[1] if len(value) > 1 and isinstance(value[1], dict) else {}
                inputs.append((name, "COMBO" if isinstance(kind, list) else str(kind), options))
        types = getattr(cls, "RETURN_TYPES", ())
        outputs = [(str(t), str(n)) for t, n in zip(types, getattr(cls, "RETURN_NAMES", None) or types)]
        defs[class_type] = {"inputs": inputs, "outputs": outputs,
                            "output_node": bool(getattr(cls, "OUTPUT_NODE", False))}
    return defs


def is_widget(kind: str, options: dict) -> bool:
    return kind in WIDGET_TYPES and not options.get("forceInput", False)


def has_seed_control(name: str, kind: str, options: dict) -> bool:
    """The frontend adds a 'control after generate' widget value after these INT inputs."""
    return kind == "INT" and (options.get("control_after_generate", False) or name in ("seed", "noise_seed"))


def widget_count(definition: dict) -> int:
    return sum(1 + has_seed_control(n, k, o) for n, k, o in definition["inputs"] if is_widget(k, o))


def ui_workflow(graph: dict, defs: dict[str, dict]) -> dict:
    """The frontend's workflow JSON for an API graph (node ids become 1..n in graph order), laid out left to right."""
    ids = {node_id: index + 1 for index, node_id in enumerate(graph)}

    @functools.cache
    def column(node_id: str) -> int:  # one more than its deepest input's
        return 1 + max((column(v[0]) for v in graph[node_id]["inputs"].values() if isinstance(v, list)), default=-1)

    column_heights: dict[int, int] = {}
    nodes, links = [], []
    output_links: dict[tuple[str, int], list[int]] = {}
    for order, (node_id, node) in enumerate(graph.items()):
        class_type = node["class_type"]
        if class_type not in defs:
            raise ValueError(f"{node_id}: node type {class_type} does not exist in this ComfyUI")
        definition = defs[class_type]
        if unknown := set(node["inputs"]) - {name for name, _, _ in definition["inputs"]}:
            raise ValueError(f"{node_id}: {class_type} has no input(s) {sorted(unknown)}")
        inputs, widgets = [], []
        for name, kind, options in definition["inputs"]:
            value = node["inputs"].get(name, options.get("default"))
            widget = is_widget(kind, options)
            link = None
            if isinstance(value, list):  # a link: [source node id, output slot]; a linked widget shows its default
                link = len(links) + 1
                links.append([link, ids[value[0]], value[1], ids[node_id], len(inputs), kind])
                output_links.setdefault((value[0], value[1]), []).append(link)
                value = options.get("default")
            if link is not None or not widget:  # a socket
                inputs.append({"name": name, "type": kind, "link": link,
                               **({"widget": {"name": name}} if widget else {})})
            if widget:
                widgets += [value, "fixed"] if has_seed_control(name, kind, options) else [value]
        x = column(node_id)
        sockets = sum(1 for i in inputs if "widget" not in i)
        height = 40 + 22 * (len(widgets) + max(sockets, len(definition["outputs"])))
        y = column_heights.get(x, 0)
        column_heights[x] = y + height + ROW_GAP
        nodes.append({"id": ids[node_id], "type": class_type, "pos": [x * COLUMN_WIDTH, y], "size": [380, height],
                      "flags": {}, "order": order, "mode": 0, "inputs": inputs, "outputs": [],
                      "properties": {"Node name for S&R": class_type}, "widgets_values": widgets,
                      **({"title": node["_meta"]["title"]} if "_meta" in node else {})})
    for node_id, entry in zip(graph, nodes):  # now that every link is known
        entry["outputs"] = [{"name": name, "type": kind, "links": output_links.get((node_id, slot), []),
                             "slot_index": slot} for slot, (kind, name) in enumerate(defs[entry["type"]]["outputs"])]
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


def render_all(defs: dict[str, dict]) -> dict[Path, str]:
    # A sampler on a preset shows the preset's values in its widgets, as the frontend extension fills them on a pick
    # (the preset table comes with the node's definition).
    presets = next(o.get(PRESETS_KEY, {}) for n, _, o in defs[SAMPLER]["inputs"] if n == "preset")
    files = {}
    for name, build in SOURCES.items():
        graph = build()
        for node in graph.values():
            if node["class_type"] == SAMPLER:
                node["inputs"].update(presets.get(node["inputs"]["preset"], {}))
        files[WORKFLOWS / "api" / f"{name}.json"] = json.dumps(graph, indent=2) + "\n"
        files[WORKFLOWS / f"{name}.json"] = json.dumps(ui_workflow(graph, defs), indent=2) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    from tools import comfy_host

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare with the files on disk")
    args = parser.parse_args(argv)
    comfy_dir = comfy_host.materialise(REPO / ".cache")
    with tempfile.TemporaryDirectory(prefix="sd35_fp8_wf_") as base:
        comfy_host.boot(comfy_dir, comfy_host.make_base_dir(Path(base), REPO))
        files = render_all(node_definitions(comfy_host.load_nodes()))
    stale = [p for p, text in files.items() if not p.exists() or p.read_text() != text]
    if args.check:
        for path in stale:
            print(f"out of date: {path.relative_to(REPO)} (run python -m tools.make_workflows)")
        return 1 if stale else 0
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    print(f"wrote {len(files)} files under {WORKFLOWS.relative_to(REPO)}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
