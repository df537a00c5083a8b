"""``api/`` runs on the roles' Protocols: no module of it imports a backend.

The backends are every module of the role packages (log, store, archive, realtime,
query) other than their ``base``, and the composition root that picks them. Known,
allowed for now: ``api/audit.py`` reads the archive through ``archive.base``'s
``ArchiveReader``, the Parquet adapter being chosen in ``clickagg.compose``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import clickagg.api

ROLE_PACKAGES = ("clickagg.log", "clickagg.store", "clickagg.archive", "clickagg.realtime")
ROLE_PACKAGES += ("clickagg.query",)
API_DIR = Path(clickagg.api.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (functions, TYPE_CHECKING blocks);
    ``from package import name`` counts as ``package.name`` too."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path.name}: relative import"
            assert node.module is not None
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def is_backend(module: str) -> bool:
    for root in ("clickagg.compose", "clickagg.runtime"):
        if module == root or module.startswith(root + "."):
            return True
    for package in ROLE_PACKAGES:
        if module.startswith(package + "."):
            return module.removeprefix(package + ".").split(".")[0] != "base"
    return False


def test_the_rule_itself() -> None:
    for backend in (
        "clickagg.store.duckdb_store",
        "clickagg.store.rpc",
        "clickagg.store.rpc.RpcQueryStore",
        "clickagg.log.segments",
        "clickagg.archive.parquet",
        "clickagg.realtime.memory",
        "clickagg.compose",
        "clickagg.runtime.supervisor",
    ):
        assert is_backend(backend), backend
    for allowed in (
        "clickagg.query.base",
        "clickagg.query.base.QueryStore",
        "clickagg.store.base",
        "clickagg.log.base.LogWriter",
        "clickagg.archive.base",
        "clickagg.store",
        "clickagg.core.windows",
        "clickagg.config",
    ):
        assert not is_backend(allowed), allowed


def test_api_imports_no_backend_module() -> None:
    modules = sorted(API_DIR.glob("*.py"))
    assert {p.name for p in modules} >= {"app.py", "queries.py", "health.py", "state.py"}
    offending = {
        path.name: sorted(m for m in imported_modules(path) if is_backend(m)) for path in modules
    }
    assert {name: found for name, found in offending.items() if found} == {}


def test_api_reads_aggregates_through_the_query_store_only() -> None:
    """Query records and errors come from the query role, not the store's adapters."""
    for path in API_DIR.glob("*.py"):
        imported = imported_modules(path)
        assert not {m for m in imported if m.startswith("clickagg.store")}, path.name


def test_api_leaves_the_stream_and_maintenance_to_other_packages() -> None:
    """HTTP only: the stream's shell (``worker``) and what runs beside serving (retention,
    in ``runtime.maintenance``, handed to the app by the composition root) stay out."""
    for path in API_DIR.glob("*.py"):
        imported = imported_modules(path)
        assert not {m for m in imported if m.startswith("clickagg.worker")}, path.name
