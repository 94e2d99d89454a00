"""Where the rules live: the folds are pure modules, and ledger/ and projections/ import each
other without a module cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PURE = ("ledger.book", "ledger.invoicing", "ledger.money", "ledger.config_versions",
        "projections.account_status",
        "projections.billing",
        "projections.fold")  # fmt: skip
# What a pure module may import from outside the standard library.
ALLOWED_THIRD_PARTY = {"psycopg.types.json"}  # Jsonb: a value wrapper for the row shapes


def modules() -> dict[str, set[str]]:
    """Every module of ledger/ and projections/ and the modules it imports (a `from package
    import name` counts as the submodule when `name` is one)."""
    names = {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for package in ("ledger", "projections")
        for path in (ROOT / package).rglob("*.py")
    }
    graph = {}
    for name, path in names.items():
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & set(names)
                imports |= subs or {node.module}
            elif isinstance(node, ast.Import):
                imports |= {a.name for a in node.names}
        graph[name] = imports
    return graph


def test_no_import_cycle_between_modules():
    graph = modules()
    edges = {m: {i for i in imports if i in graph and i != m} for m, imports in graph.items()}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*path, nxt])}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_folds_are_pure_modules():
    """No database, Kafka or logging in the folds; project imports only of other pure
    modules and the policy and price book they are given."""
    graph = modules()
    may_use = {*PURE, "ledger.policy", "ledger.rating", "ledger.config_files", "ledger.errors"}
    for module in PURE:
        imports = graph[module]
        project = {i for i in imports if i.split(".")[0] in ("ledger", "projections")}
        assert project <= may_use, f"{module} imports {project - may_use}"
        io = {
            i
            for i in imports
            if i.split(".")[0] in ("psycopg", "psycopg_pool", "kafka", "structlog")
            and i not in ALLOWED_THIRD_PARTY
        }
        assert io == set(), f"{module} imports {io}"
