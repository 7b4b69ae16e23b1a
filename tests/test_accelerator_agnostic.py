"""No code in recipe/, converters/ or bench/ names CUDA, NCCL or the NPU runtime directly.

Device, stream, memory, RNG and backend questions go through ``deepspeed.accelerator.get_accelerator()`` (wrapped by
``recipe/accelerator.py``), so the same code runs on Ascend NPUs, NVIDIA GPUs and CPU. The checks read Python through
its AST, so comments and docstrings (prose may explain what CUDA or NCCL would do) never count; shell scripts are
read line by line with comments removed.

What is flagged, and the exceptions that are allowed on purpose:

- ``torch.cuda`` / ``torch.npu`` / ``torch.backends.cuda`` / ``torch.backends.cudnn`` in any expression, and imports of
  them: ask the accelerator (``get_accelerator().memory_allocated()``, ``.synchronize()``, ``.Stream()``, ...).
- ``x.cuda(...)`` / ``x.npu(...)`` calls: move tensors with ``.to(recipe.accelerator.device())``.
- String literals that name a device or backend: ``"cuda"``, ``"cuda:0"``, ``"npu:0"``, ``"nccl"``, ``"hccl"``, and
  ``NCCL_*`` / ``CUDA_*`` variable names. Allowed: the bare string ``"npu"``, because the NPU guard itself compares
  against it (``if device.type == "npu":``); ``"gloo"``, because host-side process groups legitimately use gloo on
  every accelerator; ``HCCL_*`` / ``ASCEND_*`` variable names (they configure the NPU runtime and mean nothing
  elsewhere; their defaults live in ``recipe/npu_env.sh``).
- ``import torch_npu`` (or ``importlib.import_module("torch_npu")``) outside an NPU-only guard. A guard is the body
  (not the ``else``) of an ``if`` whose condition mentions npu (``if accelerator_name() == "npu":``,
  ``if x.device.type == "npu":``, ``if is_npu:``), or a function whose name contains ``npu``
  (``recipe.accelerator.import_npu_if_needed``, future fused-kernel wrappers such as ``_rms_norm_npu``).
  A top-level import, even inside ``try/except ImportError``, would run on every accelerator and is flagged.
"""

from __future__ import annotations

import ast
import os
import re
import textwrap

import pytest

from helpers.launch import REPO

SCANNED_DIRS = ("recipe", "converters", "bench")

_DEVICE_MODULES = {("torch", "cuda"), ("torch", "npu"), ("torch.backends", "cuda"), ("torch.backends", "cudnn")}
_FORBIDDEN_IMPORTS = re.compile(r"^torch\.(cuda|npu|backends\.(cuda|cudnn))(\.|$)")
_FORBIDDEN_STRING = re.compile(r"^cuda(:\d+)?$|^npu:\d+$|^(nccl|hccl)$|^(nccl|cuda)_[a-z0-9_]+$", re.IGNORECASE)
_SHELL_FORBIDDEN = re.compile(r"nccl|cuda", re.IGNORECASE)


def _dotted(node: ast.AST) -> str:
    """``a.b.c`` for a Name/Attribute chain, '' for anything else."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _docstring_nodes(tree: ast.AST) -> set:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                out.add(id(first.value))
    return out


def _mentions_npu(expr: ast.AST) -> bool:
    for node in ast.walk(expr):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "npu" in node.value.lower():
            return True
        if isinstance(node, ast.Name) and "npu" in node.id.lower():
            return True
        if isinstance(node, ast.Attribute) and "npu" in node.attr.lower():
            return True
    return False


def _guarded_nodes(tree: ast.AST) -> set:
    """ids of every node inside an NPU-only guard (function named *npu*, or the body of an ``if`` about npu)."""
    guarded = set()

    def mark(nodes):
        for n in nodes:
            for sub in ast.walk(n):
                guarded.add(id(sub))

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "npu" in node.name.lower():
            mark(node.body)
        elif isinstance(node, ast.If) and _mentions_npu(node.test):
            mark(node.body)
    return guarded


def python_violations(source: str, path: str = "<src>") -> list[str]:
    """Every place in ``source`` that names CUDA/NCCL/the NPU runtime directly, as ``path:line: reason``."""
    tree = ast.parse(source, filename=path)
    docstrings = _docstring_nodes(tree)
    guarded = _guarded_nodes(tree)
    found = []

    def flag(node, why):
        found.append(f"{path}:{node.lineno}: {why}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            if (_dotted(node.value), node.attr) in _DEVICE_MODULES:
                flag(node, f"{_dotted(node)}: ask deepspeed.accelerator.get_accelerator() instead")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("cuda", "npu") and _dotted(node.func.value) != "torch":
            flag(node, f".{node.func.attr}(): move tensors with .to(recipe.accelerator.device())")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _FORBIDDEN_IMPORTS.match(alias.name):
                    flag(node, f"import {alias.name}: use the accelerator")
                elif alias.name.split(".")[0] == "torch_npu" and id(node) not in guarded:
                    flag(node, "import torch_npu outside an NPU-only guard")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = {a.name for a in node.names}
            if _FORBIDDEN_IMPORTS.match(mod) or (mod == "torch" and names & {"cuda", "npu"}) or \
                    (mod == "torch.backends" and names & {"cuda", "cudnn"}):
                flag(node, f"from {mod} import {', '.join(sorted(names))}: use the accelerator")
            elif mod.split(".")[0] == "torch_npu" and id(node) not in guarded:
                flag(node, "from torch_npu import ... outside an NPU-only guard")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            value = node.value.strip()
            if _FORBIDDEN_STRING.match(value):
                flag(node, f"string {node.value!r} names a device/backend: ask the accelerator")
            elif value == "torch_npu" and id(node) not in guarded:
                flag(node, "'torch_npu' imported by name outside an NPU-only guard")
    return found


def shell_violations(source: str, path: str = "<sh>") -> list[str]:
    """Lines of a shell script that name NCCL or CUDA outside comments."""
    found = []
    for lineno, line in enumerate(source.splitlines(), 1):
        code = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
        if _SHELL_FORBIDDEN.search(code):
            found.append(f"{path}:{lineno}: names NCCL/CUDA: {line.strip()}")
    return found


def _scanned_files():
    for top in SCANNED_DIRS:
        for root, dirs, files in os.walk(os.path.join(REPO, top)):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            for name in sorted(files):
                if name.endswith((".py", ".sh")):
                    yield os.path.join(root, name)


def test_the_code_is_accelerator_agnostic():
    files = list(_scanned_files())
    assert any(f.endswith(os.path.join("recipe", "accelerator.py")) for f in files)
    problems = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        rel = os.path.relpath(path, REPO)
        problems += python_violations(source, rel) if path.endswith(".py") else shell_violations(source, rel)
    assert not problems, "device-specific names found:\n" + "\n".join(problems)


# --- the checker itself: it must flag what it claims to, and nothing else -------------------------------------

@pytest.mark.parametrize("snippet", [
    "import torch\ntorch.cuda.synchronize()",
    "import torch\nx = torch.cuda.memory_allocated()",
    "import torch\ntorch.backends.cudnn.benchmark = True",
    "import torch\ntorch.npu.set_device(0)",
    "x = y.cuda()",
    "x = y.npu(non_blocking=True)",
    "import torch.cuda",
    "from torch.cuda import amp",
    "from torch import cuda",
    "import torch_npu",
    "try:\n    import torch_npu\nexcept ImportError:\n    torch_npu = None",
    "import importlib\nm = importlib.import_module('torch_npu')",
    "if device.type == 'npu':\n    pass\nelse:\n    import torch_npu",
    "from torch_npu.contrib import transfer_to_npu",
    "dev = torch.device('cuda')",
    "dev = torch.device('cuda:1')",
    "dev = 'npu:0'",
    "backend = 'nccl'",
    "init(backend='hccl')",
    "os.environ['NCCL_DEBUG'] = 'INFO'",
    "v = os.environ.get('CUDA_VISIBLE_DEVICES')",
    "v = os.environ.get('nccl_socket_ifname')",
    "msg = f'using {\"nccl\"}'",
])
def test_checker_flags(snippet):
    assert python_violations(textwrap.dedent(snippet)), snippet


@pytest.mark.parametrize("snippet", [
    '"""Runs on CUDA with NCCL, or on NPUs with HCCL."""\nx = 1',
    "# torch.cuda.synchronize() would be wrong here\nx = 1",
    "def f():\n    '''Like tensor.cuda() but accelerator-agnostic.'''\n    return 1",
    "def import_npu_if_needed():\n    import torch_npu\n    return torch_npu",
    "def _rms_norm_npu(x):\n    import torch_npu\n    return torch_npu.npu_rms_norm(x)",
    "if accelerator_name() == 'npu':\n    import torch_npu",
    "if x.device.type == 'npu':\n    from torch_npu import npu_rms_norm",
    "import importlib\ndef load_npu():\n    return importlib.import_module('torch_npu')",
    "is_npu = name == 'npu'",
    "group = new_group(backend='gloo')",
    "t = os.environ.get('HCCL_CONNECT_TIMEOUT')",
    "x = t.to(device)",
    "msg = 'cuda graphs are not used'",
    "cudagraph = None\nclass Cudaish: pass",
])
def test_checker_allows(snippet):
    assert python_violations(textwrap.dedent(snippet)) == [], snippet


def test_shell_checker():
    script = "#!/bin/bash\n# NCCL_DEBUG would be the GPU analogue\nexport HCCL_CONNECT_TIMEOUT=1200  # not NCCL\n"
    assert shell_violations(script) == []
    assert shell_violations("export NCCL_DEBUG=INFO\n")
    assert shell_violations("CUDA_VISIBLE_DEVICES=0 python x.py\n")
