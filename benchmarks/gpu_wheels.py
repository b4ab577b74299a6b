"""Wheels of this environment's own versions of what a bare GPU machine lacks, for
``benchmarks/gpu_run.sh`` to install there without a package index.

Why: a lent GPU machine comes with CUDA torch and often an older transformers, but without
fastapi or the openai client, and may reach no package index. The first H100 run carried
these wheels; transformers 5.17 there would have differed from the 5.25 the tests run on.
Torch itself is never carried: the machine's CUDA build is the one to use.

    .venv/bin/python benchmarks/gpu_wheels.py [--out .whl] [--python 3.12]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata

# what the GPU path imports beyond torch, and their own needs a CUDA image may lack
PACKAGES = ("transformers", "huggingface_hub", "tokenizers", "safetensors", "accelerate",
            "fastapi", "starlette", "uvicorn", "pydantic", "pydantic_core", "annotated-types",
            "typing-inspection", "typing_extensions", "openai", "jiter", "sniffio", "httpx2",
            "httpcore2", "truststore", "hf-xet", "click", "kernels", "tomlkit",
            "opentelemetry-api", "typer", "gguf", "prometheus_client")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=".whl", help="where the wheels go (gitignored)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python version")
    args = parser.parse_args()
    pins = []
    for name in PACKAGES:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is not installed here: run `make test` once to set up "
                             ".venv, then run this with .venv/bin/python") from None
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps",
               "--only-binary=:all:", "--python-version", args.python, "--implementation",
               "cp", *[f"--platform={p}" for p in PLATFORMS], "-d", args.out, *pins]
    subprocess.run(command, check=True)
    print(f"{len(pins)} wheels in {args.out}: carry it to the GPU machine and run "
          "benchmarks/gpu_run.sh there")
    return 0


if __name__ == "__main__":
    sys.exit(main())
