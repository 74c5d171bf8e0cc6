"""Between ComfyUI's two workflow formats: the UI format that the frontend saves and users share
(nodes with positional widgets_values, links), and the API format that the executor runs.

`ui_to_api` is how the tests prove that a shipped workflow loads with the right widget order and
runs; `api_to_ui` writes a shareable workflow from an API prompt, laid out in columns.
"""

from __future__ import annotations

WIDGET_KINDS = ("COMBO", "INT", "FLOAT", "STRING", "BOOLEAN")


def _input_specs(nodes_module, class_type: str) -> dict[str, tuple]:
    """The node's inputs as the running release declares them (V1 INPUT_TYPES, which V3 nodes also
    expose), required before optional: the order in which the frontend creates widgets."""
    cls = nodes_module.NODE_CLASS_MAPPINGS.get(class_type)
    if cls is None:
        raise ValueError(f"no node {class_type!r} in this ComfyUI (a pack's node that is not loaded?)")
    spec = cls.INPUT_TYPES()
    return {name: entry for section in ("required", "optional") for name, entry in spec.get(section, {}).items()}


def _is_widget(entry: tuple) -> bool:
    kind, opts = entry[0], (entry[1] if len(entry) > 1 else {})
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_KINDS


def widget_names(nodes_module, class_type: str) -> list[str | None]:
    """The widget inputs of a node in the order the frontend stores their values; None marks the
    extra 'control after generate' value that seed widgets carry."""
    names: list[str | None] = []
    for name, entry in _input_specs(nodes_module, class_type).items():
        if _is_widget(entry):
            opts = entry[1] if len(entry) > 1 else {}
            names.append(name)
            if opts.get("control_after_generate") or name in ("seed", "noise_seed"):
                names.append(None)
    return names


def combo_options(entry: tuple) -> list | None:
    """The choices of a combo input: a list as the kind (V1) or "options" of a COMBO (V3)."""
    if isinstance(entry[0], list):
        return entry[0]
    if entry[0] == "COMBO" and len(entry) > 1:
        return entry[1].get("options")
    return None


def _widget_values(nodes_module, node: dict) -> dict:
    """A UI node's widget values by input name. Values are positional, so a workflow saved on a
    release whose node had fewer widgets (CreateVideo before bit_depth, 0.25) stores fewer values:
    as in the frontend, the widgets past them keep their defaults."""
    names = widget_names(nodes_module, node["type"])
    values = list(node.get("widgets_values") or [])
    if len(values) > len(names):
        raise ValueError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for the {len(names)} widgets "
            f"{[n for n in names if n]} this ComfyUI declares (saved on a release whose node has more widgets?)")
    specs = _input_specs(nodes_module, node["type"])
    out = {}
    for i, name in enumerate(names):
        if name is None:
            continue
        if i < len(values):
            out[name] = values[i]
            continue
        default = _default(specs, name)
        if default is None:
            raise ValueError(f"node {node['id']} ({node['type']}): no value for widget {name!r}, which has no default")
        out[name] = default
    return out


def ui_to_api(nodes_module, workflow: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for n in workflow["nodes"]:
        if n["type"] in ("Note", "MarkdownNote"):
            continue
        if n.get("mode", 0) in (2, 4):  # muted or bypassed: the frontend leaves it out of the prompt
            raise ValueError(f"node {n['id']} ({n['type']}) is muted or bypassed; the converter does not rewire those")
        inputs = _widget_values(nodes_module, n)
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        prompt[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return prompt


def _depths(prompt: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(key: str) -> int:
        if key not in depth:
            ups = [v[0] for v in prompt[key]["inputs"].values() if isinstance(v, list) and len(v) == 2]
            depth[key] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[key]

    for key in prompt:
        visit(key)
    return depth


def api_to_ui(nodes_module, prompt: dict, notes: str | None = None) -> dict:
    """A UI-format workflow of an API prompt: ids in prompt order, nodes in columns by depth."""
    ids = {key: i + 1 for i, key in enumerate(prompt)}
    depth = _depths(prompt)
    rows: dict[int, int] = {}
    nodes, links = [], []
    out_links: dict[tuple[str, int], list[int]] = {}
    for key, node in prompt.items():
        cls = nodes_module.NODE_CLASS_MAPPINGS[node["class_type"]]
        spec = cls.INPUT_TYPES()
        widgets = widget_names(nodes_module, node["class_type"])
        values = []
        for name in widgets:
            if name is None:
                values.append("fixed")
            else:
                values.append(node["inputs"].get(name, _default(spec, name)))
        inputs = []
        for section in ("required", "optional"):
            for name, entry in spec.get(section, {}).items():
                value = node["inputs"].get(name)
                if isinstance(value, list) and len(value) == 2:
                    link_id = len(links) + 1
                    src_type = _return_types(nodes_module, prompt[value[0]]["class_type"])[value[1]]
                    links.append([link_id, ids[value[0]], value[1], ids[key], len(inputs), src_type])
                    out_links.setdefault((value[0], value[1]), []).append(link_id)
                    inputs.append({"name": name, "type": src_type, "link": link_id})
        col = depth[key]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({
            "id": ids[key], "type": node["class_type"], "pos": [40 + 360 * col, 60 + 200 * row],
            "size": [320, 120], "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": [],
            "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values,
        })
    for n, key in zip(nodes, prompt):
        n["outputs"] = [{"name": t, "type": t, "slot_index": i, "links": out_links.get((key, i), [])}
                        for i, t in enumerate(_return_types(nodes_module, prompt[key]["class_type"]))]
    for order, key in enumerate(sorted(prompt, key=lambda k: depth[k])):
        nodes[ids[key] - 1]["order"] = order
    if notes:
        nodes.append({"id": len(nodes) + 1, "type": "MarkdownNote", "pos": [40, 60 + 200 * max(rows.values(), default=1)],
                      "size": [700, 160], "flags": {}, "order": len(nodes), "mode": 0, "inputs": [], "outputs": [],
                      "properties": {}, "widgets_values": [notes]})
    return {"last_node_id": len(nodes), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _return_types(nodes_module, class_type: str) -> list[str]:
    return list(nodes_module.NODE_CLASS_MAPPINGS[class_type].RETURN_TYPES)


def _default(specs: dict, name: str):
    """The default of input `name` in a spec: the INPUT_TYPES dict or the flat dict of _input_specs."""
    if "required" in specs or "optional" in specs:
        entry = specs.get("required", {}).get(name) or specs.get("optional", {}).get(name)
    else:
        entry = specs.get(name)
    opts = entry[1] if len(entry) > 1 else {}
    if "default" in opts:
        return opts["default"]
    options = combo_options(entry)
    if options:
        return options[0]
    return None
