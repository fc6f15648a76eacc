"""The layering in docs/architecture.md holds: contracts, no import cycles, no side effects on import."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("galaxy", "planner", "devices")

# Function-level imports of the project's own modules, each for a reason that is not a cycle: `devices`
# stays importable without torch or grpc (`python -m devices` runs inside network namespaces), so it
# reaches the transport only when it starts or talks to workers.
LAZY_IMPORTS = {
    ("devices.emulate", "galaxy.transport.client"),
    ("devices.emulate", "galaxy.transport.spawn"),
    ("devices.emulate", "galaxy.transport.worker"),
    ("devices.layout", "galaxy.transport.spawn"),
}


def test_import_contracts_are_kept():
    """pyproject.toml's [tool.importlinter]: layers, pure compute without grpc/psutil/argparse. In a
    process of its own: import-linter configures logging, which would silence this one's loggers."""
    run = ("import sys; from importlinter.cli import lint_imports; "
           "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))")
    r = subprocess.run([sys.executable, "-c", run], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_no_module_imports_itself_back():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain:
                cycles.append((module, *chain))
    assert not cycles, f"import cycles: {cycles[:5]}"


def _function_level_imports():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "v1" in path.relative_to(ROOT).parts:
                continue  # generated protobuf code
            parts = path.relative_to(ROOT).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            tree = ast.parse(path.read_text())
            for fn in ast.walk(tree):
                if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(fn):
                    if isinstance(node, ast.ImportFrom):
                        if node.level:
                            base = module.split(".")[: len(module.split(".")) - node.level + (parts[-1] == "__init__")]
                            target = ".".join(base + ([node.module] if node.module else []))
                        else:
                            target = node.module or ""
                        if target.split(".")[0] in PACKAGES:
                            yield module, target


def test_function_level_imports_of_our_modules_are_only_the_documented_lazy_ones():
    found = set(_function_level_imports())
    assert found == LAZY_IMPORTS, f"unexpected: {sorted(found - LAZY_IMPORTS)}; gone: {sorted(LAZY_IMPORTS - found)}"


def test_importing_the_package_changes_nothing_and_loads_no_api():
    probe = ("import os, sys; before = dict(os.environ); import galaxy; "
             "assert dict(os.environ) == before, 'the environment changed'; "
             "heavy = [m for m in ('torch', 'grpc', 'galaxy.runtime.api', 'planner') if m in sys.modules]; "
             "assert not heavy, heavy; "
             "import galaxy.parallel.sharding; "
             "assert 'grpc' not in sys.modules and 'galaxy.runtime.api' not in sys.modules; "
             "assert callable(galaxy.connect) and issubclass(galaxy.PeerUnreachable, galaxy.GalaxyError)")
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
