#!/usr/bin/env python
"""Check a vLLM source tree against every vLLM seam vllm-sjd uses, without importing vLLM.

    python scripts/check_vllm_seams.py VLLM_SOURCE_DIR [--against OTHER_VLLM_SOURCE_DIR]

A source dir is the folder holding the `vllm` package (an unpacked wheel, a
checkout). Everything is read with `ast`, so this runs anywhere, without CUDA.
One line per check: section, status, what, (why).

  seam    each function a patch wraps or a subclass overrides (SEAMS) exists, fits
          our override's parameters, and is still called the way the patch relies on;
  self    what our subclasses (SUBCLASSES) read from `self`/`super()` and do not
          define is defined by the vLLM class or its bases;
  import  each `import vllm...` / `from vllm... import X` in patches/ and vllm_sjd/
          (at any scope) resolves to a module, or a name defined or re-exported there;
  attr    each attribute our code reads or sets on a vLLM module, class, or object
          of known type (TYPED, and `self.x = VllmClass(...)`) exists;
  call    each call from our code into vLLM fits the callee's signature;
  diff    with --against: each seam, its caller, and what we call or read is
          IDENTICAL or DIFFERS (ast.unparse) in the other tree: read those by hand.

Exit status 1 on any MISSING or CHANGED-SIGNATURE. Source only: behaviour,
and attributes reached through getattr() or torch's nn.Module, are the reader's
(docs/vllm-0.33-audit.md).
"""

import argparse
import ast
import re
import sys
from pathlib import Path

from vllm_seams import (  # noqa: E402 - scripts/ is on sys.path when run
    OUR_DIRS, REPO, SEAMS, SUBCLASSES, TYPED,
)
HARMLESS_BASES = {"ABC", "object", "Protocol", "Generic", "Enum", "IntEnum", "StrEnum", "NamedTuple",
                  "TypedDict"}
DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def norm(node):
    return re.sub(r"\[[^\[\]]*\]", "[]", ast.unparse(node))


def find_def(module_ast, qualname):
    """The def/class at qualname, descending through classes and functions."""
    node = module_ast
    for part in qualname.split("."):
        node = next((n for n in node.body if isinstance(n, DEFS) and n.name == part), None)
        if node is None:
            return None
    return node


def decorators(fn):
    return {ast.unparse(d).split(".")[-1] for d in fn.decorator_list}


def assigned_names(stmt):
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
    return [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]


def in_order(node):
    return sorted(ast.walk(node), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0)))


class Tree:
    """A vLLM source tree, parsed on demand. A resolved name is (kind, module, node),
    kind one of module/class/function/value/external, or None when undefined."""

    def __init__(self, root):
        self.root, self._cache = Path(root), {}
        if not (self.root / "vllm" / "__init__.py").is_file():
            sys.exit(f"{root}: no vllm/__init__.py here")

    def cached(self, key, make):
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def path(self, module):
        base = self.root.joinpath(*module.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()),
                    base if base.is_dir() else None)  # a namespace package

    def parse(self, module):
        p = self.path(module)
        empty = ast.Module([], [])
        return self.cached(("ast", module), lambda: ast.parse(p.read_text()) if p and p.is_file() else empty)

    def absolute(self, module, level, name):
        if not level:
            return name
        package = module.split(".")[: None if str(self.path(module)).endswith("__init__.py") else -1]
        return ".".join(package[: len(package) - level + 1] + ([name] if name else []))

    def bindings(self, module):
        return self.cached(("bindings", module), lambda: self._bindings(module))

    def _bindings(self, module):
        """Module-level names: defs, assignments, imports, and `__getattr__` lazy tables."""
        found, tables, todo = {}, [], list(self.parse(module).body)
        while todo:
            stmt = todo.pop(0)
            if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
                todo += stmt.orelse  # what exists at run time
            elif isinstance(stmt, (ast.If, ast.Try, ast.With)):  # platform checks, try/except ImportError
                todo += stmt.body + getattr(stmt, "orelse", []) + getattr(stmt, "finalbody", [])
                todo += [s for h in getattr(stmt, "handlers", []) for s in h.body]
            elif isinstance(stmt, DEFS):
                found[stmt.name] = ("class" if isinstance(stmt, ast.ClassDef) else "function", stmt)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                found.update((name, ("value", stmt)) for name in assigned_names(stmt))
                tables += [stmt.value] if isinstance(stmt.value, ast.Dict) else []
            elif isinstance(stmt, ast.Import):
                for a in stmt.names:
                    top = a.name.split(".")[0]
                    found[a.asname or top] = ("import", a.name if a.asname else top)
            elif isinstance(stmt, ast.ImportFrom):
                source = self.absolute(module, stmt.level, stmt.module)
                for a in stmt.names:
                    found["*" + source if a.name == "*" else a.asname or a.name] = ("from", source, a.name)
        if "__getattr__" in found:  # lazy exports: `name == "x"` in __getattr__, or tables like MODULE_ATTRS
            for n in ast.walk(found["__getattr__"][1]):
                if isinstance(n, ast.Compare):
                    names = [c.value for c in [n.left, *n.comparators] if isinstance(c, ast.Constant)]
                    found.update((v, ("value", n)) for v in names if isinstance(v, str) and v not in found)
            for table in tables:
                for k, v in zip(table.keys, table.values):
                    if isinstance(k, ast.Constant) and isinstance(k.value, str) and k.value not in found:
                        found[k.value] = ("lazy", v.value if isinstance(v, ast.Constant) else None)
        return found

    def resolve(self, module, name, depth=0):
        if not module.startswith("vllm") or depth > 30:
            return ("external", module, None)
        b = self.bindings(module).get(name)
        if b is None:
            if self.path(f"{module}.{name}"):
                return ("module", f"{module}.{name}", None)
            stars = [v[1] for k, v in self.bindings(module).items() if k.startswith("*")]
            return next(filter(None, (self.resolve(s, name, depth + 1) for s in stars)), None)
        if b[0] in ("class", "function", "value"):
            return (b[0], module, b[1])
        if b[0] == "import":
            return ("module", b[1], None) if self.path(b[1]) else ("external", b[1], None)
        if b[0] == "from":
            if b[1].startswith("vllm") and self.path(f"{b[1]}.{b[2]}"):
                return ("module", f"{b[1]}.{b[2]}", None)
            return self.resolve(b[1], b[2], depth + 1)
        if isinstance(b[1], str) and ":" in b[1]:  # lazy ".engine.arg_utils:EngineArgs"
            target, attr = b[1].split(":")
            level = len(target) - len(target.lstrip("."))
            return self.resolve(self.absolute(module, level, target[level:]), attr, depth + 1)
        return ("value", module, None)

    def resolve_expr(self, module, expr):
        if isinstance(expr, ast.Name):
            return self.resolve(module, expr.id)
        if isinstance(expr, ast.Subscript):  # Generic[T], Protocol[T]
            return self.resolve_expr(module, expr.value)
        if isinstance(expr, ast.Attribute):
            return self.member(self.resolve_expr(module, expr.value), expr.attr)
        return None

    def members(self, module, cls, depth=0):
        """name -> resolved, over the class and its bases (found by name within the tree)."""
        key = ("members", module, cls.name, cls.lineno)
        return self.cached(key, lambda: self._members(module, cls, depth))

    def _members(self, module, cls, depth):
        found = {}
        for base in reversed(cls.bases):
            r = self.resolve_expr(module, base)
            if r and r[0] == "class" and depth < 20 and r[2] is not cls:
                found.update(self.members(r[1], r[2], depth + 1))
        for n in ast.walk(cls):  # self.x = ... in any method
            if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store) and norm(n.value) == "self":
                found.setdefault(n.attr, ("value", module, n))
        for stmt in cls.body:
            if isinstance(stmt, DEFS):
                found[stmt.name] = ("class" if isinstance(stmt, ast.ClassDef) else "function", module, stmt)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                found.update((name, ("value", module, stmt)) for name in assigned_names(stmt))
        return found

    def member(self, owner, attr):
        if owner is None or owner[0] == "external":
            return owner
        if owner[0] == "module":
            return self.resolve(owner[1], attr)
        if owner[0] in ("class", "instance"):
            return self.members(owner[1], owner[2]).get(attr)
        return ("external", owner[1], None)  # an attribute of a value: not followed

    def lookup(self, module, qualname):
        """A module-level name, or Class.member through the class's bases."""
        head, *rest = qualname.split(".")
        r = self.resolve(module, head)
        for part in rest:
            r = self.member(r, part)
        return r

    def owner_class(self, module, node):
        owners = self.cached(("owners", module), lambda: {
            id(s): c for c in ast.walk(self.parse(module)) if isinstance(c, ast.ClassDef) for s in c.body})
        return owners.get(id(node))

    def is_method(self, r):
        return self.owner_class(r[1], r[2]) is not None and "staticmethod" not in decorators(r[2])

    def qualname(self, r):
        owner = self.owner_class(r[1], r[2])
        return f"{owner.name}.{r[2].name}" if owner else r[2].name

    def external_bases(self, module, cls, depth=0):
        """Bases from outside the tree (nn.Module...) that may hold attributes we cannot see."""
        found = []
        for base in cls.bases:
            r = self.resolve_expr(module, base)
            if r and r[0] == "class" and depth < 20:
                found += self.external_bases(r[1], r[2], depth + 1)
            elif ast.unparse(base).split("[")[0].split(".")[-1] not in HARMLESS_BASES:
                found.append(ast.unparse(base))
        return found

    def source(self, module, qualname):
        r = self.lookup(module, qualname)
        return ast.unparse(r[2]) if r and r[0] in ("function", "class") else None


def signature(fn, method):
    """(positional names, keyword-only names, required names, *args?, **kwargs?), without self/cls."""
    a = fn.args
    pos = [p.arg for p in a.posonlyargs + a.args][1 if method else 0:]
    required = pos[: len(pos) - len(a.defaults)]
    required += [p.arg for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return pos, [p.arg for p in a.kwonlyargs], required, a.vararg is not None, a.kwarg is not None


def call_signature(tree, r):
    """What a call of r (a function, or a class: its __init__ or its fields) must fit; None if unknown."""
    if r[0] == "function":
        return signature(r[2], tree.is_method(r))
    init = tree.members(r[1], r[2]).get("__init__")
    if init and init[0] == "function":
        return signature(init[2], True)
    fields = [n for _, _, n in tree.members(r[1], r[2]).values() if isinstance(n, ast.AnnAssign)
              and isinstance(n.target, ast.Name) and "ClassVar" not in ast.unparse(n.annotation)]
    if not fields or tree.external_bases(r[1], r[2]):
        return None
    return [n.target.id for n in fields], [], [n.target.id for n in fields if n.value is None], False, False


def fits(expected, theirs):
    """Why vLLM's signature does not fit what our code expects, or None."""
    pos, kwonly, _, var, kw = theirs
    if expected[0] == "named":
        missing = [p for p in expected[1] if p not in pos + kwonly]
        return f"no parameter {', '.join(missing)}" if missing else None
    our_pos, our_kwonly, _, our_var, our_kw = expected[1]
    if our_var or our_kw:  # we pass the rest through: the parameters we name must line up
        ok = pos[: len(our_pos)] == our_pos and all(k in pos + kwonly for k in our_kwonly)
    else:
        ok = pos == our_pos and sorted(kwonly) == sorted(our_kwonly) and not var and not kw
    ours_shown = ", ".join(our_pos + our_kwonly + (["..."] if our_var or our_kw else []))
    theirs_shown = ", ".join(pos + kwonly + (["*args"] if var else []) + (["**kwargs"] if kw else []))
    return None if ok else f"ours ({ours_shown}), vLLM's ({theirs_shown})"


def call_problem(call, sig):
    """Why this call does not fit the signature, or None."""
    pos, kwonly, required, var, kw = sig
    starred = any(isinstance(x, ast.Starred) for x in call.args) or any(k.arg is None for k in call.keywords)
    if len(call.args) > len(pos) and not var and not starred:
        return f"{len(call.args)} positional arguments for ({', '.join(pos)})"
    unknown = [k.arg for k in call.keywords if k.arg and k.arg not in pos + kwonly]
    if unknown and not kw:
        return f"no parameter {', '.join(unknown)}"
    given = set(pos[: len(call.args)]) | {k.arg for k in call.keywords}
    missing = [p for p in required if p not in given]
    return f"missing {', '.join(missing)}" if missing and not starred else None


class Report:
    def __init__(self):
        self.failures, self.seen = 0, set()

    def line(self, section, status, what, why=""):
        if (section, status, what, why) not in self.seen:
            self.seen.add((section, status, what, why))
            self.failures += status in ("MISSING", "CHANGED-SIGNATURE")
            print(f"{section:6} {status:17} {what}" + (f"  ({why})" if why else ""))


def parse_ours(path):
    return ast.parse((REPO / path).read_text())


def our_def(path, qualname):
    """Our override/wrapper named in a table; a stale table is this script's bug."""
    node = find_def(parse_ours(path), qualname)
    if node is None:
        sys.exit(f"check_vllm_seams.py: no {qualname} in {path}; update the tables")
    return node


def describe(tree, r):
    return r[1] if r[0] == "module" else f"{r[1]}.{tree.qualname(r)}"


DIFFED = {}  # (module, qualname) -> why --against compares it


class OurFile:
    """One of our files: its vLLM imports (any scope), and what its expressions stand for."""

    def __init__(self, tree, path):
        self.tree, self.ast, self.imports, self.typed = tree, parse_ours(path), {}, {}
        for n in ast.walk(self.ast):
            if isinstance(n, ast.Import):
                self.imports.update((a.asname or "vllm", ("module", a.name if a.asname else "vllm", None))
                                    for a in n.names if a.name.split(".")[0] == "vllm")
            elif isinstance(n, ast.ImportFrom) and not n.level and n.module.split(".")[0] == "vllm":
                self.imports.update((a.asname or a.name, tree.resolve(n.module, a.name)) for a in n.names)
        for f, expr, module, cls in TYPED:
            if f == path:
                r = tree.lookup(module, cls)
                self.typed[expr] = ("instance",) + r[1:] if r and r[0] == "class" else ("gone", module, cls)
        for n in ast.walk(self.ast):  # self.x = VllmClass(...): self.x is one
            if isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.value, ast.Call):
                target, r = norm(n.targets[0]), self.resolve(n.value.func)
                if target.startswith("self.") and r and r[0] == "class":
                    self.typed.setdefault(target, ("instance",) + r[1:])

    def resolve(self, expr):
        """What a vLLM expression is; ("missing", owner, attr); or None when not vLLM's."""
        if norm(expr) in self.typed:
            return self.typed[norm(expr)]
        if isinstance(expr, ast.Name):
            return self.imports.get(expr.id)
        owner = self.resolve(expr.value) if isinstance(expr, ast.Attribute) else None
        if owner and owner[0] in ("module", "class", "instance"):
            found = self.tree.member(owner, expr.attr)
            if found is None and owner[0] != "module" and self.tree.external_bases(owner[1], owner[2]):
                return ("external", owner[1], None)  # maybe from torch's nn.Module
            return found or ("missing", owner, expr.attr)
        return None


def check_call(report, tree, where, call, r):
    if r is None or r[0] not in ("function", "class") or (sig := call_signature(tree, r)) is None:
        return
    problem = call_problem(call, sig)
    # A keyword that lands in **kwargs is legal, but may be one vLLM renamed: say so.
    spill = [k.arg for k in call.keywords if k.arg and k.arg not in sig[0] + sig[1]]
    note = problem or (f"into **kwargs: {', '.join(spill)}" if spill else "")
    report.line("call", "CHANGED-SIGNATURE" if problem else "OK", f"{where} -> {describe(tree, r)}", note)
    init = tree.members(r[1], r[2]).get("__init__") if r[0] == "class" else None
    target = init if init and init[0] == "function" else r  # a class: diff its __init__
    DIFFED.setdefault((target[1], tree.qualname(target)), "called by us")


def check_seams(report, tree):
    """SEAMS: each exists, fits our override, and is still called as the patch relies on."""
    for module, qualname, expected, needs in SEAMS:
        seam, r = f"{module}.{qualname}", tree.lookup(module, qualname)
        DIFFED[(module, qualname)] = ""
        if not r or r[0] not in ("function", "class"):
            report.line("seam", "MISSING", seam, "not defined")
            continue
        problems, method, our_sig = [], tree.is_method(r), None
        if needs.get("decorator") and needs["decorator"] not in decorators(r[2]):
            problems.append(f"not a {needs['decorator']}")
        if expected and expected[0] == "ours":
            our_sig = signature(our_def(expected[1], expected[2]), method)
            expected = ("ours", our_sig)
        problems += [p for p in [expected and fits(expected, signature(r[2], method))] if p]
        for caller, callee, keywords in needs.get("called_by", []):
            where = tree.lookup(*caller.split(":")) if ":" in caller else tree.lookup(module, caller)
            scopes = [] if not where or where[0] not in ("function", "class") else \
                [where[2]] if where[0] == "function" else [s for s in where[2].body if isinstance(s, DEFS)]
            found = []
            for scope in scopes:
                here = [n for n in ast.walk(scope) if isinstance(n, ast.Call) and norm(n.func) == callee]
                if here:
                    found += here
                    scope_name = tree.qualname(("function", where[1], scope))
                    DIFFED.setdefault((where[1], scope_name), "calls a seam")
            if not found:
                problems.append(f"{caller} no longer calls {callee}")
            elif any(k not in {kw.arg for kw in c.keywords} for c in found for k in keywords):
                problems.append(f"{caller} calls {callee} without {', '.join(keywords)}=")
            # vLLM's own calls of the seam must fit our override too (new arguments would break it).
            problems += [f"{caller} calls it with: {p}" for c in found if our_sig and
                         callee.split(".")[-1] == qualname.split(".")[-1] and (p := call_problem(c, our_sig))]
        status = "CHANGED-SIGNATURE" if problems else "OK"
        status = "MISSING" if any("no longer" in p for p in problems) else status
        report.line("seam", status, seam, "; ".join(problems))


def check_subclasses(report, tree):
    """What our subclasses take from `self` and `super()` must come from the vLLM class."""
    for group, module, cls in SUBCLASSES:
        vllm_cls, label = tree.lookup(module, cls), f"{'+'.join(q.split('.')[-1] for _, q in group)} -> {cls}"
        if not vllm_cls or vllm_cls[0] != "class":
            report.line("self", "MISSING", label, f"no class {module}.{cls}")
            continue
        theirs = tree.members(vllm_cls[1], vllm_cls[2])
        nodes, ours_defined = [(path, our_def(path, q)) for path, q in group], set()
        for _, node in nodes:
            if isinstance(node, ast.ClassDef):
                ours_defined |= {s.name for s in node.body if isinstance(s, DEFS)}
                ours_defined |= {norm(s.target) for s in node.body if isinstance(s, ast.AnnAssign)}
            ours_defined |= {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(
                n.ctx, ast.Store) and norm(n.value) == "self" and n.attr not in theirs}
        for path, node in nodes:
            called = {id(c.func): c for c in ast.walk(node) if isinstance(c, ast.Call)}
            for n in in_order(node):
                if not isinstance(n, ast.Attribute) or not (
                        norm(n.value) == "super()" or norm(n.value) == "self" and n.attr not in ours_defined):
                    continue
                r = theirs.get(n.attr)
                if id(n) in called and r and r[0] == "function":
                    check_call(report, tree, f"{path}: {ast.unparse(n)}", called[id(n)], r)
                else:
                    report.line("self", "OK" if r else "MISSING", f"{label}: {norm(n)}",
                                "" if r else f"not defined by {cls} or its bases")


def check_our_code(report, tree):
    """Imports, attributes of vLLM things, and calls into vLLM, in every file of ours."""
    for p in sorted(f for d in OUR_DIRS for f in (REPO / d).rglob("*.py")):
        path = str(p.relative_to(REPO))
        f = OurFile(tree, path)
        called = {id(c.func) for c in ast.walk(f.ast) if isinstance(c, ast.Call)}
        for n in in_order(f.ast):
            if isinstance(n, ast.Import) or isinstance(n, ast.ImportFrom) and not n.level:
                for mod in [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module]:
                    if mod.split(".")[0] != "vllm":
                        continue
                    if not tree.path(mod):
                        report.line("import", "MISSING", f"{path}: {mod}", "no such module")
                    elif isinstance(n, ast.Import):
                        report.line("import", "OK", f"{path}: import {mod}")
                    for a in n.names if isinstance(n, ast.ImportFrom) and tree.path(mod) else []:
                        r = tree.resolve(mod, a.name)
                        report.line("import", "OK" if r else "MISSING", f"{path}: from {mod} import {a.name}",
                                    "" if r else "not defined there")
            elif isinstance(n, ast.Attribute):
                r, owner = f.resolve(n), f.resolve(n.value)
                if owner and owner[0] == "gone":  # a TYPED class no longer there
                    report.line("attr", "MISSING", f"{path}: {norm(n.value)}",
                                f"no class {owner[1]}.{owner[2]}")
                elif owner and owner[0] in ("module", "class", "instance") and not (
                        id(n) in called and r[0] in ("function", "class")):  # else the call's line says it
                    missing = r[0] == "missing"
                    why = f"{describe(tree, owner)} has no {n.attr}" if missing else \
                        "not in the tree: maybe from torch's nn.Module" if r[0] == "external" else ""
                    report.line("attr", "MISSING" if missing else "OK", f"{path}: {norm(n)}", why)
            elif isinstance(n, ast.Call):
                r = f.resolve(n.func)
                if r and r[0] == "instance":  # calling an nn.Module or another callable object
                    r = tree.members(r[1], r[2]).get("__call__") or tree.members(r[1], r[2]).get("forward")
                check_call(report, tree, f"{path}: {ast.unparse(n.func)}", n, r)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", help="folder holding the vllm package")
    parser.add_argument("--against", help="another such folder: which sources differ")
    args = parser.parse_args()
    tree, report = Tree(args.source), Report()
    print(f"# vLLM source {args.source}" + (f", compared with {args.against}" if args.against else ""))
    check_seams(report, tree)
    check_subclasses(report, tree)
    check_our_code(report, tree)
    if args.against:
        other = Tree(args.against)
        for _, _, module, cls in TYPED:
            if (r := tree.lookup(module, cls)) and r[0] == "class":
                DIFFED.setdefault((r[1], cls), "read by us")
        for (module, qualname), why in sorted(DIFFED.items(), key=lambda kv: (kv[1], kv[0])):
            mine, theirs = tree.source(module, qualname), other.source(module, qualname)
            status = "ABSENT" if theirs is None else "IDENTICAL" if mine == theirs else "DIFFERS"
            report.line("diff", status, f"{module}.{qualname}", why)
    print(f"# {report.failures} failure(s)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
