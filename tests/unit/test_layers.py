"""Unit: imports only run downward. Every `job` module sits on a floor (STYLE.md, "The house"); an import,
at module level or inside a function, may only reach a lower floor or, within a package, a module that does
not import it back. No cycles anywhere."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The answer checks and their sandbox are a library the spec (train.rewards), the data (a task's checks) and the
# evaluation all use: they sit below all three.
FLOORS = [  # top to bottom; a module not listed belongs to the floor of its package
    {"job.__main__", "job.cli"},
    {"job.runner", "job.preflight", "job.bench", "job.report", "job.inspection", "job.chat", "job.init",
     "job.docgen"},
    {"job.stages"},
    {"job.backends", "job.evaluation", "job.harness", "job.checkpoint_sync", "job.card", "job.metrics", "job.specfile",
     "job.tracking"},
    {"job.sweep", "job.modelsrc", "job.checkpoints", "job.data", "job.preference", "job.tasks"},
    {"job.spec", "job.rundir", "job.llamacpp", "job.templates", "job.fingerprint", "job.hub", "job.distributed",
     "job.interrupt", "job.convert_shim", "job.inputs", "job.shapes", "job.render", "job.render_worker", "job.display",
     "job.basecache", "job.nodes", "job.evaluation.checks", "job.evaluation.sandbox"},
    {"job.log", "job.errors", "job.settings", "job.events", "job.methods", "job.statefile", "job"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def floor(name: str) -> int:
    for level, members in enumerate(FLOORS):
        if name in members:
            return level
    return floor(name.rsplit(".", 1)[0])


def imports() -> dict[str, set[str]]:
    graph = {}
    modules = {module_name(p) for p in (ROOT / "job").rglob("*.py")}
    for path in (ROOT / "job").rglob("*.py"):
        name, found = module_name(path), set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "job":
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    found.add(child if child in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "job"}
        graph[name] = found - {name}
    return graph


def test_no_import_runs_upward():
    upward = []
    for name, targets in imports().items():
        for target in targets:
            if target == "job" or target.startswith(name + "."):
                continue  # the package's own version, or a package importing its own modules
            if floor(target) < floor(name):
                upward.append(f"{name} (floor {floor(name)}) imports {target} (floor {floor(target)})")
    assert upward == []


def test_no_import_cycles():
    graph = imports()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, trail):
        state[node] = 1
        for target in graph.get(node, ()):
            if target.startswith(node + ".") or target == "job":
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join(trail[trail.index(target):] + [target]) if target in trail else target)
            elif target in graph and not state.get(target):
                visit(target, trail + [target])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [node])
    assert cycles == []
