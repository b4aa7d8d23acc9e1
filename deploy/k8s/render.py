"""Render this directory's kustomizations without kubectl.

Implements exactly the subset of kustomize that deploy/k8s uses, so the test suite can
render and validate the manifests on machines without kubectl:

- ``resources``: files (multi-document YAML) and directories holding a kustomization;
- ``configMapGenerator`` with ``files`` / ``literals``, the content-hash name suffix
  (kustomize's algorithm, so names match ``kubectl kustomize``) and the rewrite of
  references to the generated ConfigMap in pod templates;
- ``namespace``;
- ``patches`` holding a JSON 6902 patch (inline ``patch`` or ``path``) with a ``target``
  selected by kind and name.

Anything else in a kustomization is an error, not silently ignored::

    .venv/bin/python deploy/k8s/render.py deploy/k8s/overlays/cpu
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]

SUPPORTED_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "configMapGenerator",
    "generatorOptions",
    "namespace",
    "patches",
}


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or is broken."""


def _go_json(value: Any) -> str:
    """Encode like Go's json.Marshal of a map: sorted keys, no spaces, HTML-escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def configmap_hash(data: dict[str, str]) -> str:
    """kustomize's name suffix for a generated ConfigMap (api/hasher in kustomize).

    kustomize v5 hashes the generated object before it has a name, so the encoded name is
    empty; checked against ``kubectl kustomize`` (kustomize v5.5.0).
    """
    digest = hashlib.sha256(
        _go_json({"data": data, "kind": "ConfigMap", "name": ""}).encode()
    ).hexdigest()
    swap = {"0": "g", "1": "h", "3": "k", "a": "m", "e": "t"}
    return "".join(swap.get(c, c) for c in digest[:10])


def _load_kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    if not path.is_file():
        raise RenderError(f"{directory}: no kustomization.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    unknown = set(data) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(f"{path}: unsupported kustomize fields {sorted(unknown)}")
    return data


def _generate_configmaps(
    directory: Path, kust: dict[str, Any]
) -> tuple[list[Manifest], dict[str, str]]:
    options = kust.get("generatorOptions") or {}
    unknown = set(options) - {"disableNameSuffixHash"}
    if unknown:
        raise RenderError(f"{directory}: unsupported generatorOptions {sorted(unknown)}")
    out: list[Manifest] = []
    renames: dict[str, str] = {}
    for gen in kust.get("configMapGenerator") or []:
        unknown = set(gen) - {"name", "files", "literals"}
        if unknown:
            raise RenderError(f"{directory}: unsupported configMapGenerator {sorted(unknown)}")
        data: dict[str, str] = {}
        for entry in gen.get("files") or []:
            key, _, rel = entry.rpartition("=")
            data[key or Path(rel).name] = (directory / rel).read_text()
        for entry in gen.get("literals") or []:
            key, _, value = entry.partition("=")
            data[key] = value
        name = gen["name"]
        final = name
        if not options.get("disableNameSuffixHash"):
            final = f"{name}-{configmap_hash(data)}"
        renames[name] = final
        out.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": final}, "data": data}
        )
    return out, renames


def _pod_spec(obj: Manifest) -> dict[str, Any] | None:
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        return spec
    template = spec.get("template") or (spec.get("jobTemplate") or {}).get("spec", {}).get(
        "template"
    )
    return (template or {}).get("spec")


def _rename_configmap_refs(obj: Manifest, renames: dict[str, str]) -> None:
    pod = _pod_spec(obj)
    if not pod:
        return
    for volume in pod.get("volumes") or []:
        ref = volume.get("configMap")
        if ref and ref.get("name") in renames:
            ref["name"] = renames[ref["name"]]
    for container in (pod.get("containers") or []) + (pod.get("initContainers") or []):
        for env_from in container.get("envFrom") or []:
            ref = env_from.get("configMapRef")
            if ref and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]
        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and ref.get("name") in renames:
                ref["name"] = renames[ref["name"]]


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_json6902(obj: Manifest, ops: list[dict[str, Any]]) -> None:
    for op in ops:
        parts = _pointer(op["path"])
        parent: Any = obj
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        kind = op["op"]
        if isinstance(parent, list):
            index = len(parent) if last == "-" else int(last)
            if kind == "add":
                parent.insert(index, op["value"])
            elif kind == "replace":
                parent[index] = op["value"]
            elif kind == "remove":
                del parent[index]
            else:
                raise RenderError(f"unsupported JSON patch op {kind!r}")
        else:
            if kind in ("replace", "remove") and last not in parent:
                raise RenderError(f"JSON patch {kind} of missing path {op['path']}")
            if kind in ("add", "replace"):
                parent[last] = op["value"]
            elif kind == "remove":
                del parent[last]
            else:
                raise RenderError(f"unsupported JSON patch op {kind!r}")


def _apply_patches(directory: Path, kust: dict[str, Any], objects: list[Manifest]) -> None:
    for patch in kust.get("patches") or []:
        unknown = set(patch) - {"target", "patch", "path"}
        if unknown:
            raise RenderError(f"{directory}: unsupported patch fields {sorted(unknown)}")
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise RenderError(f"{directory}: only JSON 6902 patches (a list of ops) are supported")
        target = patch.get("target") or {}
        unknown = set(target) - {"kind", "name"}
        if unknown:
            raise RenderError(f"{directory}: unsupported patch target fields {sorted(unknown)}")
        matched = [
            o
            for o in objects
            if o.get("kind") == target.get("kind", o.get("kind"))
            and o["metadata"]["name"] == target.get("name", o["metadata"]["name"])
        ]
        if not matched:
            raise RenderError(f"{directory}: patch target {target} matches nothing")
        for obj in matched:
            _apply_json6902(obj, ops)


def render(directory: str | Path) -> list[Manifest]:
    """Render the kustomization in ``directory`` into a list of Kubernetes objects."""
    directory = Path(directory).resolve()
    kust = _load_kustomization(directory)
    objects: list[Manifest] = []
    for entry in kust.get("resources") or []:
        path = directory / entry
        if path.is_dir():
            objects.extend(render(path))
        else:
            objects.extend(copy.deepcopy(d) for d in yaml.safe_load_all(path.read_text()) if d)
    generated, renames = _generate_configmaps(directory, kust)
    objects = generated + objects
    for obj in objects:
        _rename_configmap_refs(obj, renames)
    _apply_patches(directory, kust, objects)
    namespace = kust.get("namespace")
    if namespace:
        for obj in objects:
            obj["metadata"]["namespace"] = namespace
    return objects


def main(argv: list[str] | None = None) -> int:
    """Print the rendered objects of the kustomization given as the only argument."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: render.py KUSTOMIZATION_DIR", file=sys.stderr)
        return 2
    yaml.safe_dump_all(render(args[0]), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
