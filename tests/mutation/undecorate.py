"""Rewrite a module (in run.sh's scratch copy) so that mutmut 3 mutates its @torch.no_grad() functions.

mutmut 3.8.1 skips every decorated function except static/class methods (file_mutation.py: "ignore decorated
functions"), so without this the solvers' loops (ddim, treg, cci, ...) get no mutants at all. Each top-level

    @torch.no_grad()
    def f(...): ...

becomes `def f(...): ...` followed at once by `f = torch.no_grad()(f)`: the same wrapper applied at the same
point of the module, so names bound later (e.g. a SOLVERS dict) still see the wrapped function.
    python tests/mutation/undecorate.py treg/solvers/latent.py
"""
import ast
import sys

path = sys.argv[1]
lines = open(path).read().splitlines(keepends=True)
edits = []
for node in ast.parse("".join(lines)).body:
    if (isinstance(node, ast.FunctionDef) and len(node.decorator_list) == 1
            and ast.unparse(node.decorator_list[0]) == "torch.no_grad()"):
        decorator = node.decorator_list[0]
        assert decorator.lineno == decorator.end_lineno, f"{path}:{decorator.lineno}: multi-line decorator"
        edits.append((decorator.lineno, node.end_lineno, node.name))
for decorator_line, end_line, name in reversed(edits):  # bottom-up, so earlier line numbers stay valid
    lines.insert(end_line, f"{name} = torch.no_grad()({name})\n")
    del lines[decorator_line - 1]
open(path, "w").write("".join(lines))
print(f"{path}: {len(edits)} @torch.no_grad() functions made mutable: {', '.join(e[2] for e in edits)}")
