"""Convert-time fusions of a conv with what follows it: BatchNorm2d folded into the conv's weights,
then ReLU / ReLU6 / SiLU / Hardswish fused into its epilogue. A fusion is made only where the
model's own forward cannot tell: the modules that follow are replaced by nn.Identity, so each must
be called exactly once, on the conv's (or the BatchNorm's) output and nothing else.

Two ways of knowing that: a torch.fx trace of the model (any module: ResNet and MobileNet blocks
with their own forward), and, for a model fx cannot trace only, the children of a plain
nn.Sequential (called in order by nn.Sequential.forward; a subclass with its own forward is not
trusted). Where the trace worked it is the only authority: a conv it sees called more than once (say
through its nn.Sequential and on its own) is not fused. A module with forward hooks is never folded
or fused (replacing it by nn.Identity would drop them).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

__all__ = ["REWRITE_KEY", "BlockRewrite", "ConvFusion", "FxGraph", "activation_name", "any_hooks", "conv_fusions",
           "fx_graph", "handoff_chains", "rewrite_residual_blocks"]

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.SiLU: "silu", nn.Hardswish: "hardswish"}


def activation_name(mod: object) -> str | None:
    """The fused-epilogue name of an activation module (exact types only), else None."""
    name = _ACT_MODULES.get(type(mod))
    if name is not None:
        return name
    if type(mod) is nn.Hardtanh and mod.min_val == 0.0 and mod.max_val == 6.0:
        return "relu6"
    return None


@dataclass
class ConvFusion:
    """What follows one conv: a BatchNorm2d to fold and/or an activation to fuse, each as
    (parent module, child name) so it can be replaced by nn.Identity."""

    bn: tuple[nn.Module, str] | None = None
    act: tuple[nn.Module, str] | None = None
    act_name: str | None = None
    traced: bool = True  # False: known from nn.Sequential order only (the model has no fx trace)

    def module(self, which: str) -> nn.Module | None:
        slot = getattr(self, which)
        return None if slot is None else slot[0]._modules[slot[1]]

    def describe(self) -> str:
        parts = (["BatchNorm2d folded"] if self.bn else []) + ([f"{self.act_name} fused"] if self.act else [])
        text = " + ".join(parts)
        if text and not self.traced:
            # fx could not trace the model: a parent that calls the Sequential's children one by
            # one itself would see the fused conv (skip the conv then)
            text += " (from nn.Sequential order: the model has no fx trace)"
        return text


def _hooked(mod: nn.Module) -> bool:
    return bool(mod._forward_hooks or mod._forward_pre_hooks)


def _fusable_act(mod: object) -> str | None:
    return None if not isinstance(mod, nn.Module) or _hooked(mod) else activation_name(mod)


def _foldable_bn(mod: object, channels: int) -> bool:
    return (
        type(mod) is nn.BatchNorm2d
        and not _hooked(mod)
        and not mod.training
        and mod.track_running_stats
        and mod.running_mean is not None
        and mod.num_features == channels
    )


def _parent_slot(model: nn.Module, fqn: str) -> tuple[nn.Module, str]:
    parent, _, child = fqn.rpartition(".")
    return model.get_submodule(parent), child


class FxGraph:
    """A torch.fx trace of a model, read for fusions: which module each call_module node calls, how
    many nodes call each module, and a node's only user."""

    def __init__(self, model: nn.Module, gm) -> None:
        self.model = model
        self.nodes = list(gm.graph.nodes)
        self.calls: dict[int, int] = {}  # id(module) -> how many call_module nodes call it
        for node in self.nodes:
            if node.op == "call_module":
                mod = model.get_submodule(node.target)
                self.calls[id(mod)] = self.calls.get(id(mod), 0) + 1

    def module_of(self, node) -> nn.Module | None:
        return self.model.get_submodule(node.target) if node is not None and node.op == "call_module" else None

    @staticmethod
    def only_user(node):
        users = list(node.users)
        return users[0] if len(users) == 1 else None

    def feeds_only(self, producer: nn.Module, consumer: nn.Module) -> bool:
        """Whether `producer` is called once, its output goes to `consumer` alone, as that call's only
        argument, and `consumer` is called nowhere else: consumer(producer(x)) and nothing more."""
        if self.calls.get(id(producer)) != 1 or self.calls.get(id(consumer)) != 1:
            return False
        for node in self.nodes:
            if self.module_of(node) is producer:
                nxt = self.only_user(node)
                return (self.module_of(nxt) is consumer and len(nxt.args) == 1 and nxt.args[0] is node
                        and not nxt.kwargs)  # fmt: skip
        return False


def fx_graph(model: nn.Module, leaves: tuple[nn.Module, ...] = ()) -> FxGraph | None:
    """The model's torch.fx trace, or None where fx cannot trace it (data-dependent control flow,
    most transformers models). `leaves`: modules kept as call_module nodes besides torch.nn's own
    (layers and activations from other libraries, which fx would otherwise trace through)."""
    keep = {id(m) for m in leaves}

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return id(m) in keep or super().is_leaf_module(m, qualname)

    try:
        return FxGraph(model, torch.fx.GraphModule(model, Tracer().trace(model)))
    except Exception:  # noqa: BLE001 (any model fx cannot trace)
        return None


def conv_fusions(model: nn.Module, convs: dict[int, nn.Module], shared: set[int],
                 graph: FxGraph | None = None) -> dict[int, ConvFusion]:  # fmt: skip
    """id(conv) -> its fusion, for the convs to convert (`convs`: id -> module). Modules in `shared`
    (registered under several names) never take part. graph: the model's fx_graph (None: no trace)."""
    found = _fx_fusions(graph, convs, shared) if graph is not None else None
    if found is None:  # no trace: nn.Sequential chains only, said so in the report
        found = {}
        _sequential_fusions(model, convs, shared, found)
        for f in found.values():
            f.traced = False
    return {k: v for k, v in found.items() if v.bn or v.act}


def _sequential_fusions(model, convs, shared, found) -> None:
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward or id(parent) in shared:
            continue
        keys = list(parent._modules)
        for i, key in enumerate(keys):
            conv = parent._modules[key]
            if conv is None or id(conv) not in convs or id(conv) in shared or id(conv) in found:
                continue
            fusion = ConvFusion()
            j = i + 1
            if j < len(keys) and _foldable_bn(parent._modules[keys[j]], conv.out_channels) and id(parent._modules[keys[j]]) not in shared:
                fusion.bn = (parent, keys[j])
                j += 1
            if j < len(keys) and _fusable_act(parent._modules[keys[j]]) and id(parent._modules[keys[j]]) not in shared:
                fusion.act = (parent, keys[j])
                fusion.act_name = _fusable_act(parent._modules[keys[j]])
            found[id(conv)] = fusion


def _fx_fusions(graph: FxGraph, convs, shared) -> dict[int, ConvFusion]:
    model, calls, module_of, only_user = graph.model, graph.calls, graph.module_of, graph.only_user
    found: dict[int, ConvFusion] = {}
    for node in graph.nodes:
        conv = module_of(node)
        if conv is None or id(conv) not in convs or id(conv) in shared or calls.get(id(conv)) != 1:
            continue
        fusion = ConvFusion()
        nxt = only_user(node)
        mod = module_of(nxt)
        if (mod is not None and _foldable_bn(mod, conv.out_channels) and calls.get(id(mod)) == 1
                and id(mod) not in shared and nxt.args[0] is node and len(nxt.args) == 1 and not nxt.kwargs):  # fmt: skip
            fusion.bn = _parent_slot(model, nxt.target)
            node, nxt = nxt, only_user(nxt)
            mod = module_of(nxt)
        if (mod is not None and _fusable_act(mod) and calls.get(id(mod)) == 1 and id(mod) not in shared
                and nxt.args[0] is node and len(nxt.args) == 1 and not nxt.kwargs):  # fmt: skip
            fusion.act = _parent_slot(model, nxt.target)
            fusion.act_name = activation_name(mod)
        found[id(conv)] = fusion
    return found


# ------------------------------------------------------------------------ bf16 between convs

# torch modules a handed-over bf16 tensor may pass through between two convs of a chain: each keeps
# its input's dtype and touches nothing else
_PASSTHROUGH = (nn.ReLU, nn.ReLU6, nn.Identity, nn.Dropout, nn.Hardtanh, nn.SiLU, nn.Hardswish)


def handoff_chains(model: nn.Module, layers: tuple[type, ...], keep=None,
                   bare: set[str] | None = None) -> list[list[str]]:  # fmt: skip
    """Chains of converted convs (modules of the types `layers`) in which each conv's output goes to
    the next one alone (through activations, dropout or the nn.Identity left by fusions, none of them
    hooked) and to nothing else: qualified names in order, two or more per chain, each conv in one
    chain at most. keep(producer, consumer): which such links to use (None: all). bare, when given,
    receives the names of the producers whose output reaches the next conv through identities alone
    (nn.Identity, the Fused left by fusions): the links that may carry bytes rather than values.
    Only from the model's torch.fx trace: without one (unlike the fusions) nothing is linked, since
    a parent that iterates over an nn.Sequential itself would be handed bf16. What the trace cannot
    see is not known either: an output also stored in an attribute, or returned by another method,
    is read in bf16 there."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    convs = {id(m): m for m in model.modules() if isinstance(m, layers) and not _hooked(m) and len(names[id(m)]) == 1}
    # every fastinfer module a leaf (their forwards branch on the call's kind: fx cannot trace them)
    graph = fx_graph(model, leaves=tuple(m for m in model.modules() if type(m).__module__.startswith("fastinfer.nn.")))
    edges: dict[int, int] = {}  # id(conv) -> id(the conv it feeds alone)
    if graph is not None:
        for node in graph.nodes:
            mod = graph.module_of(node)
            if mod is None or id(mod) not in convs or graph.calls.get(id(mod)) != 1:
                continue
            nxt = graph.only_user(node)
            identities = True
            # (a stateless activation may be shared, as ResNet's one ReLU: each call is its own node)
            while (graph.module_of(nxt) is not None and _passes_through(graph.module_of(nxt))
                   and not _hooked(graph.module_of(nxt)) and len(nxt.args) == 1 and nxt.args[0] is not None
                   and not nxt.kwargs):  # fmt: skip (a hook would see the bf16 tensor)
                identities = identities and type(graph.module_of(nxt)).forward is nn.Identity.forward
                nxt = graph.only_user(nxt)
            after = graph.module_of(nxt)
            # (a residual a rewritten block adds in the consumer's epilogue is another tensor: no bar)
            if (after is not None and id(after) in convs and graph.calls.get(id(after)) == 1 and len(nxt.args) == 1
                    and set(nxt.kwargs) <= {"residual"} and nxt.kwargs.get("residual") is not nxt.args[0]
                    and after is not mod):  # fmt: skip
                edges[id(mod)] = id(after)
                if identities and bare is not None:
                    bare.add(names[id(mod)][0])
    if keep is not None:
        edges = {a: b for a, b in edges.items() if keep(convs[a], convs[b])}
    targets = set(edges.values())
    chains = []
    for start in edges:
        if start in targets:
            continue
        chain, cur, seen = [start], start, {start}
        while cur in edges and edges[cur] not in seen:
            cur = edges[cur]
            chain.append(cur)
            seen.add(cur)
        chains.append([names[i][0] for i in chain])
    return chains


def _passes_through(mod: nn.Module) -> bool:
    """An activation, dropout or identity (fastinfer.nn.Fused included): dtype kept, nothing else read."""
    return type(mod) in _PASSTHROUGH or type(mod).forward is nn.Identity.forward


# ------------------------------------------------------------- residual blocks, rewritten with fx

# What a rewritten block's graph may hold besides its submodules' calls: the add, relu, nothing else
# (any other op, a constant or a Python value read at trace time would be frozen by the rewrite).
_ADDS = {operator.add, operator.iadd, torch.add}
_ACT_FUNCTIONS = {torch.relu: "relu", torch.nn.functional.relu: "relu", torch.nn.functional.relu6: "relu6"}
_ACT_METHODS = {"relu": "relu", "relu_": "relu"}
_FUSABLE_ACTS = ("relu", "relu6")  # the ones with a gradient through the conv's epilogue
REWRITE_KEY = "_fastinfer_rewrite"  # the record on a rewritten block (see rewrite_residual_blocks)


@dataclass
class BlockRewrite:
    """One block rewritten: its qualified name and, per conv (qualified name), what now runs in the
    conv's epilogue ("relu fused", "residual add + relu fused", ...)."""

    name: str
    fused: dict[str, str]


def _leaf_tracer(root: nn.Module):
    class Tracer(torch.fx.Tracer):
        # only the block's own forward (and its plain nn.Sequential containers) is traced: any other
        # submodule stays one call, so its forward, hooks and class stay what they are
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return not (type(m) is nn.Sequential or m is root)

    return Tracer()


def any_hooks(mod: nn.Module) -> bool:
    """Forward, backward or state_dict hooks of any kind on the module itself."""
    return any(getattr(mod, h, None) for h in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
        "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"))  # fmt: skip


def _forward_hides_state(block: nn.Module) -> bool:
    """Whether the block's forward does what its fx trace cannot show: a `with` statement
    (torch.no_grad, autocast: fx drops them), or `a += b` that writes a tensor someone else holds
    (an argument or a name bound to another name: `identity = x; identity += out` writes x, which
    fx traces as a new tensor; `out += identity` on a name bound to a call's result is kept). A
    forward whose source cannot be read counts as hiding state."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(type(block).forward)))
    except (OSError, TypeError, SyntaxError):
        return True
    func = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) else None
    if func is None:
        return True
    shared = {a.arg for a in (*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs)}
    for n in ast.walk(func):  # names ever bound to another name (aliases of what they hold)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name):
            shared.update(t.id for t in n.targets if isinstance(t, ast.Name))
    for n in ast.walk(func):
        if isinstance(n, (ast.With, ast.AsyncWith)):
            return True
        if isinstance(n, ast.AugAssign) and (not isinstance(n.target, ast.Name) or n.target.id in shared):
            return True
    return False


def _plain_graph(graph, block: nn.Module) -> bool:
    """Whether the traced graph is only submodule calls on tensors, adds and relus: what a rewrite
    can keep as it is. A placeholder with a default, a constant argument, a get_attr, any other
    function or method, or a traced-through container with hooks and the block is left alone."""
    for node in graph.nodes:
        if node.op == "placeholder":
            if node.args:  # a default value: fx would bake it in
                return False
        elif node.op == "call_module":
            if node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
                return False
            parts = node.target.split(".")
            for i in range(1, len(parts)):  # the containers traced through
                if any_hooks(block.get_submodule(".".join(parts[:i]))):
                    return False
        elif node.op == "call_function":
            if node.target in _ADDS:
                if len(node.args) != 2 or node.kwargs or not all(isinstance(a, torch.fx.Node) for a in node.args):
                    return False
            elif node.target in _ACT_FUNCTIONS:
                if len(node.args) != 1 or set(node.kwargs) - {"inplace"}:
                    return False
            else:
                return False
        elif node.op == "call_method":
            if node.target not in _ACT_METHODS or len(node.args) != 1 or node.kwargs:
                return False
        elif node.op != "output":
            return False
    return True


def _activation_of(node, block: nn.Module) -> str | None:
    """The fused-epilogue name of a relu / relu6 call node on one tensor argument, else None."""
    if node is None or len(node.args) != 1:
        return None
    name = None
    if node.op == "call_module":
        mod = block.get_submodule(node.target)
        name = None if node.kwargs or _hooked(mod) else activation_name(mod)
    elif node.op == "call_function" and node.target in _ACT_FUNCTIONS and set(node.kwargs) <= {"inplace"}:
        name = _ACT_FUNCTIONS[node.target]
    elif node.op == "call_method" and node.target in _ACT_METHODS and not node.kwargs:
        name = _ACT_METHODS[node.target]
    return name if name in _FUSABLE_ACTS else None


def _skip_identities(node, block: nn.Module):
    """The node's only user, past nn.Identity calls (the Fused left where a BatchNorm was folded)."""
    nxt = FxGraph.only_user(node)
    while (nxt is not None and nxt.op == "call_module" and len(nxt.args) == 1 and not nxt.kwargs
           and type(block.get_submodule(nxt.target)).forward is nn.Identity.forward
           and not _hooked(block.get_submodule(nxt.target))):  # fmt: skip
        nxt = FxGraph.only_user(nxt)
    return nxt


def _in_place(node, block: nn.Module) -> bool:
    """Whether a node may write a tensor in place (then nothing may be moved across it)."""
    if node.op == "call_module":
        return bool(getattr(block.get_submodule(node.target), "inplace", False))
    if node.op == "call_function":
        return node.target is operator.iadd or bool(node.kwargs.get("inplace"))
    if node.op == "call_method":
        return node.target.endswith("_")
    return False


def rewrite_residual_blocks(model: nn.Module, conv_type: type, only: set[str] | None = None) -> list[BlockRewrite]:
    """Fuses what a block's own forward does after its converted convs, where nn.Identity cannot be
    put in place of a module: a ReLU module the block calls several times (ResNet's one ReLU), a
    functional relu, and the residual add of a ResNet or MobileNet block (conv -> add -> relu
    becomes conv(x, residual=...) with relu in its epilogue: one pass instead of three). Each such
    block is traced with torch.fx (its submodules stay calls), its graph edited, and replaced in its
    parent by the fx GraphModule of the edited graph, whose class name is the block's: the same
    submodules under the same names, state_dict keys unchanged.

    Only what the rewrite keeps exactly: the whole model must trace (each fused conv called once in
    it), the block must have no hooks of any kind (nor the containers traced through), nothing in
    its forward a trace drops (a `with` statement, `+=` on a tensor it does not own), and a graph of
    submodule calls, adds and relus only (no constants, defaults or other ops: nothing read at
    trace time). A conv fuses when it is `conv_type` (off the
    depthwise path for the add), unhooked, registered under one name, and its output reaches the add
    or the relu alone; `out += r` fuses, `r += out` does not; nothing is moved across an in-place op.
    Returns what was rewritten, innermost blocks first. only: the names of the blocks to consider
    (None: all). The GraphModule keeps {conv's name in the block: the activation it took, or None}
    as REWRITE_KEY (kept by deepcopy and pickling; fastinfer.save records it, load redoes it)."""
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    whole = fx_graph(model, leaves=tuple(m for m in model.modules() if type(m).__module__.startswith("fastinfer.nn.")))
    if whole is None:
        return []  # a conv could be called from anywhere fx does not see
    done: list[BlockRewrite] = []
    blocks = [(n, m) for n, m in model.named_modules() if n and type(m).forward is not nn.Sequential.forward
              and not isinstance(m, (conv_type, torch.fx.GraphModule)) and any(isinstance(c, conv_type) for c in m.modules())]  # fmt: skip
    for name, block in reversed(blocks):  # innermost first (named_modules is pre-order)
        if only is not None and name not in only:
            continue
        if any_hooks(block) or len(names[id(block)]) != 1 or type(block).__module__.startswith("fastinfer.nn."):
            continue
        try:
            graph = _leaf_tracer(block).trace(block)
        except Exception:  # noqa: BLE001 (data-dependent control flow and the like: left as it is)
            continue
        if not _plain_graph(graph, block) or _forward_hides_state(block):
            continue
        fused = _edit_block_graph(graph, block, conv_type, names, whole.calls)
        if not fused:
            continue
        gm = _graph_module(block, graph)
        if gm is None:
            continue
        for target, (act, _) in fused.items():  # committed: the convs apply what the graph no longer does
            if act is not None:
                block.get_submodule(target).activation = act
        record = {target: act for target, (act, _) in fused.items()}
        setattr(gm, REWRITE_KEY, record)
        gm.meta.setdefault("_user_preserved_attributes", {})[REWRITE_KEY] = record  # survives deepcopy
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, gm)
        done.append(BlockRewrite(name, {f"{name}.{c}": how for c, (_, how) in fused.items()}))
    return done


def _graph_module(block: nn.Module, graph):
    """The GraphModule of the edited graph holding the block's own children, whole: a get_attr node
    per child makes GraphModule install that very module (an nn.Sequential stays one, with the
    modules the graph no longer calls: a folded BatchNorm's Fused, a ReLU whose calls all moved),
    also when a deepcopy or an unpickling rebuilds it from the graph. None when the state_dict
    keys would change."""
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        for child_name, _ in block.named_children():
            graph.get_attr(child_name)
    for node in graph.nodes:  # annotations (strings under `from __future__ import annotations`)
        node.type = None  # would be globals of the generated code, which pickle cannot import
    graph.lint()
    gm = torch.fx.GraphModule(block, graph, class_name=type(block).__name__)
    for pname, p in block.named_parameters(recurse=False):
        gm.register_parameter(pname, p)
    for bname, b in block.named_buffers(recurse=False):
        gm.register_buffer(bname, b, persistent=bname not in block._non_persistent_buffers_set)
    gm.train(block.training)
    return gm if set(gm.state_dict()) == set(block.state_dict()) else None


def _edit_block_graph(graph, block: nn.Module, conv_type: type, names: dict[int, list[str]],
                      calls: dict[int, int]) -> dict[str, tuple[str | None, str]]:  # fmt: skip
    """Edits the traced graph in place; returns {conv's name in the block: (the activation it is to
    fuse or None, what it now fuses in words)}. calls: id(module) -> its calls in the whole model's
    trace. The convs themselves are not changed here."""
    fused: dict[str, tuple[str | None, str]] = {}
    for node in list(graph.nodes):
        if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        conv = block.get_submodule(node.target)
        if (not isinstance(conv, conv_type) or _hooked(conv) or len(names[id(conv)]) != 1 or calls.get(id(conv)) != 1
                or conv.activation is not None):  # fmt: skip
            continue
        nxt = _skip_identities(node, block)
        residual = add = None
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and conv._adds_residual:
            a, b = nxt.args
            if _reaches(a, node, block):
                other = b
            elif _reaches(b, node, block) and nxt.target is not operator.iadd:  # `r += out` writes r
                other = a
            else:
                other = None
            if isinstance(other, torch.fx.Node) and not _depends_on(other, node):
                residual, add = other, nxt
                nxt = FxGraph.only_user(add)
        act = _activation_of(nxt, block)
        if residual is None and act is None:
            continue
        last = nxt if act is not None else add
        chain = _chain(node, last)
        order = {n: i for i, n in enumerate(graph.nodes)}
        between = [n for n in graph.nodes if order[node] < order[n] < order[last] and n not in chain]
        if any(_in_place(n, block) for n in between):
            continue  # the conv would read, or the add see, a tensor written in between
        with graph.inserting_after(last):
            new = graph.call_module(node.target, (node.args[0],), {"residual": residual} if residual is not None else {})
        last.replace_all_uses_with(new)
        for dead in chain:  # last, then back to the conv call
            graph.erase_node(dead)
        what = (["residual add"] if residual is not None else []) + ([act] if act else [])
        fused[node.target] = (act, " + ".join(what) + " fused")
    graph.lint()
    return fused


def _reaches(node, conv_node, block) -> bool:
    """Whether `node` is the conv call itself or the nn.Identity calls right after it."""
    while node is not conv_node:
        if (not isinstance(node, torch.fx.Node) or node.op != "call_module" or len(node.args) != 1
                or type(block.get_submodule(node.target)).forward is not nn.Identity.forward):  # fmt: skip
            return False
        node = node.args[0]
    return True


def _depends_on(node, target) -> bool:
    """Whether `node` is computed from `target` (then it cannot be the conv's residual)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n is target:
            return True
        if id(n) in seen:
            continue
        seen.add(id(n))
        stack.extend(a for a in n.all_input_nodes)
    return False


def _chain(first, last) -> list:
    """The nodes from `last` back to `first` along single-argument links, last first (erase order)."""
    out, node = [], last
    while True:
        out.append(node)
        if node is first:
            return out
        node = next(a for a in node.args if isinstance(a, torch.fx.Node) and _depends_on(a, first))
