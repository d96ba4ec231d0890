"""residual: ``activation(body(x) + shortcut(x))``, optionally ``repeat`` copies in a row.

Config (DESIGN.md section 8)::

    - type: residual
      repeat: 2                 # copies in a row, each with its own weights (default 1)
      body: [...]               # required, a non-empty list of layers (may hold residual blocks)
      shortcut: identity        # default; or a list of layers, e.g. a 1x1 stride-2 conv + batchnorm
      activation: relu          # after the add: relu (default) or none

Both branches must give the same shape; config validation says otherwise, naming the block
(``model.layers[3]``), the copy and both shapes. Every copy applies the same ``body`` and
``shortcut`` specs to its input (the previous copy's output), so a shape that changes in copy 0
(a strided body with a projection shortcut) must also work for copy 1's smaller input.

Sub-layers and keys. Copy ``r`` (from 0) holds ``body[j]`` and ``shortcut[j]`` as children named
``<r>.body.<j>`` and ``<r>.shortcut.<j>``: state-dict keys are ``layers.<i>.<r>.body.<j>.<name>``
and ``layers.<i>.<r>.shortcut.<j>.<name>``, nested blocks extending the path the same way; the
summary shows one row per sub-layer under the block's row. ``parameter_shapes`` lists every
copy's sub-layer parameters under these relative keys, so config validation's model-size check
counts them. The block's own FLOPs are 0 (the add, an elementwise op, counts 0 as ReLU does);
its sub-layers' are counted on their own rows (``fastcnn bench`` times the block as one row and
divides the FLOPs of its whole subtree). ``own_output_shapes()``: the sums the block writes, one per
copy, which the summary's activation memory adds to its sub-layers' outputs.

Building: sub-layers are built with the model's rng, init scheme and dtype, in a fixed order:
copy 0 body[0], body[1], ..., then copy 0 shortcut[0], ..., then copy 1 likewise. Each branch
runs through ``fastcnn.fusion.plan_blocks`` (batchnorm+relu, relu+maxpool fused inside the body
as at the top level); a fused block never spans the block's input, which feeds two consumers
(each branch is planned on its own, from its first layer). With ``fuse = False`` (set by
``build_model(..., fuse=False)``, passed on to nested blocks) the branches run their layers
unfused.

Forward, copy by copy: ``s = x`` (identity) or ``shortcut(x)``, ``b = body(x)``; then
``relu(b + s)`` (or ``b + s``) in one pass (fastcnn/kernels/residual.py) into a buffer the
block owns for that copy. That buffer is the copy's output (the next copy's input, or the
block's output): valid until the next forward, as the protocol asks. In evaluation, when the body
ends in a convolution + batch norm block (fastcnn/fusion.ConvBatchNorm, no ReLU after the batch
norm), that convolution (batch norm folded into its weights) adds the shortcut and applies the
ReLU as it writes each output row: no pass of the add's own. A backward after such
a forward (rare) first runs the evaluation forward again block by block, as the unfused blocks do,
so each block holds what its backward reads.

Backward, copy by copy from the last: ``g = dy * (y > 0)`` (ReLU's gradient read from the
copy's output, which is <= 0 exactly where the sum was; NaN passes, as torch) into a buffer
the block owns; ``g`` goes to both branches (none writes into it). The copy's input gradient
``dx_body + dx_shortcut`` (``dx_shortcut = g`` for the identity) is, for copy r > 0, added and
masked by copy r-1's ReLU in one pass, straight into copy r-1's ``g`` buffer; for copy 0 added
into a ``dx`` buffer the block owns: never into one received (a branch may hand back ``g``
itself). Each pass adds the same two floats as the unfused ``np.add`` + ReLU: bit-identical
results. With ``need_input_grad=False`` copy 0's branches skip their input gradients.

Dropout inside a block: ``fastcnn.model.build_model`` gives every dropout nested in a container
the model seed and an index unique in the model: the top-level layers keep their positions
``0 .. L-1`` (L = len(model.layers)); nested ones get ``L, L+1, ...`` in ``named_modules()``
order (depth first: copy 0 body, copy 0 shortcut, copy 1, ...). ``Sequential`` sets their
``.step`` like any layer with ``uses_step``. A block built on its own (outside build_model)
numbers its nested dropouts 0, 1, ... in the same order, seed 0.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from ..errors import ConfigError
from ..schema import REQUIRED, choice, integer
from .base import Layer, kernel_module

kernels = kernel_module("residual")


def _ends_in_conv_batchnorm(block):
    """Whether a body's last block is a convolution + batch norm (no ReLU: fastcnn/fusion.py),
    whose evaluation forward can add the shortcut and apply the block's ReLU itself."""
    from ..fusion import ConvBatchNorm  # the fusion module imports the layers

    return isinstance(block, ConvBatchNorm) and not block.relu


def _layer_list(value, path):
    from . import check_layer_list  # the package imports this module while it is being built

    return check_layer_list(value, path)


def _body(value, path):
    return _layer_list(value, path)


def _shortcut(value, path):
    if value == "identity":
        return value
    if not isinstance(value, list) or not value:
        raise ConfigError(path, f"must be 'identity' or a non-empty list of layers; got {value!r}")
    return _layer_list(value, path)


def _strip(message: str, path: str) -> str:
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


# Layers one block may expand to (every copy, nested blocks' copies included): a `repeat` of 10**8
# would otherwise plan (and hang on) 10**8 layers before any other check; ResNet-152 has about 150.
MAX_BLOCK_LAYERS = 10_000


class Residual(Layer):
    kind = "residual"
    options = {
        "body": (_body, REQUIRED),
        "shortcut": (_shortcut, "identity"),
        "activation": (choice("relu", "none"), "relu"),
        "repeat": (integer(1), 1),
    }
    fuse = True  # plan fused blocks inside the branches (build_model(..., fuse=False) sets False)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self.body_specs = list(c["body"])
        self.shortcut_specs = None if c["shortcut"] == "identity" else list(c["shortcut"])
        self.activation = c["activation"]
        self.repeat = c["repeat"]
        self.copies: List[Tuple[list, list]] = []  # per copy: (body layers, shortcut layers or [])

    # -- declaration -------------------------------------------------------
    @staticmethod
    def _branch_shapes(specs, in_shape, path, branch, copy_note):
        """[(layer, in, out), ...] through one branch; a sub-layer's ConfigError names its config
        path (``model.layers[3].body[1]``), plus the copy when the block repeats."""
        from . import layer_from_config

        plan, shape = [], tuple(in_shape)
        for j, spec in enumerate(specs):
            layer = layer_from_config(spec)
            sub_path = f"{path}.{branch}[{j}]"
            try:
                out = tuple(layer.output_shape(shape, sub_path))
            except ConfigError as e:
                if not copy_note:
                    raise
                raise ConfigError(e.path, f"{_strip(str(e), e.path)} ({copy_note})") from None
            plan.append((layer, shape, out))
            shape = out
        return plan, shape

    def expanded_layers(self, limit=MAX_BLOCK_LAYERS):
        """How many layers the block's copies hold, nested blocks expanded (counting stops past ``limit``)."""
        from . import layer_from_config

        one = 0
        for spec in self.body_specs + (self.shortcut_specs or []):
            one += layer_from_config(spec).expanded_layers(limit) if spec["type"] == self.kind else 1
            if one > limit:
                break
        return self.repeat * one

    def _plan(self, in_shape, path="residual"):
        """Per copy: (in_shape, body plan, shortcut plan or None, out_shape)."""
        size = self.expanded_layers()
        if size > MAX_BLOCK_LAYERS:
            raise ConfigError(f"{path}.repeat", f"the block expands to {size:,} layers ({self.repeat:,} copies, nested "
                                                f"blocks expanded), more than {MAX_BLOCK_LAYERS:,}")
        plans, shape = [], tuple(in_shape)
        for r in range(self.repeat):
            note = f"copy {r} of {self.repeat}, input {shape}" if self.repeat > 1 else ""
            body, b_out = self._branch_shapes(self.body_specs, shape, path, "body", note)
            if self.shortcut_specs is None:
                short, s_out = None, shape
            else:
                short, s_out = self._branch_shapes(self.shortcut_specs, shape, path, "shortcut", note)
            if b_out != s_out:
                what = "identity shortcut (its input)" if short is None else "shortcut"
                hint = (" (a projection shortcut, e.g. [{type: conv2d, filters: C, kernel_size: 1, stride: S, "
                        "bias: false}, {type: batchnorm}], can match them)" if short is None else "")
                raise ConfigError(path, f"copy {r} (of {self.repeat}): the body gives {b_out} but the {what} "
                                        f"gives {s_out} for input {shape}; both branches must give the same "
                                        f"shape{hint}")
            plans.append((shape, body, short, b_out))
            shape = b_out
        return plans

    def output_shape(self, in_shape, path="residual"):
        return self._plan(in_shape, path)[-1][3]

    def parameter_shapes(self, in_shape):
        shapes = {}
        for r, (_, body, short, _) in enumerate(self._plan(in_shape)):
            for branch, plan in (("body", body), ("shortcut", short or [])):
                for j, (layer, s_in, _) in enumerate(plan):
                    for name, shape in layer.parameter_shapes(s_in).items():
                        shapes[f"{r}.{branch}.{j}.{name}"] = tuple(shape)
        return shapes

    def flops(self, batch):
        return 0  # the add; the sub-layers count on their own (summary rows, named_modules())

    def describe(self):
        text = "residual" + (f" x{self.repeat}" if self.repeat > 1 else "")
        if self.shortcut_specs is None:
            text += " identity"
        else:
            text += " shortcut " + "+".join(spec["type"] for spec in self.shortcut_specs)
        if self.activation == "none":
            text += ", no activation"
        return text

    def own_output_shapes(self):
        """Per-sample shapes of the activations the block itself writes (its sub-layers' outputs
        aside): each copy's sum, its output (the summary's activation memory counts them)."""
        return [out for _, out in self.copy_shapes]

    def children(self):
        out = []
        for r, (body, short) in enumerate(self.copies):
            out += [(f"{r}.body.{j}", layer) for j, layer in enumerate(body)]
            out += [(f"{r}.shortcut.{j}", layer) for j, layer in enumerate(short)]
        return out

    # -- building ----------------------------------------------------------
    def build(self, in_shape, rng, dtype):
        from ..fusion import plan_blocks

        super().build(in_shape, rng, dtype)
        self.copies, self._runs, self.copy_shapes = [], [], []
        for shape, body, short, out in self._plan(in_shape):
            built = []
            for plan in (body, short or []):
                layers = []
                for layer, s_in, _ in plan:
                    layer.init, layer.fuse = self.init, self.fuse  # nested blocks plan as this one
                    layer.build(s_in, rng, self.dtype)
                    layers.append(layer)
                built.append(layers)
            self.copies.append((built[0], built[1]))
            plan = plan_blocks if self.fuse else list
            self._runs.append((plan(built[0]), plan(built[1]) if short is not None else None))
            self.copy_shapes.append((shape, out))
        # Nested dropout: distinct mask indices within the block (build_model then numbers them model-wide).
        stepped = [m for _, m in self.named_modules() if m is not self and getattr(m, "uses_step", False)]
        for n, m in enumerate(stepped):
            m.index = n

    def branch_blocks(self):
        """What forward runs, block by block: each copy's body blocks, then its shortcut blocks (fused
        blocks or layers; nested residual blocks as they are)."""
        return [block for body, short in self._runs for block in list(body) + list(short or ())]

    # -- running -----------------------------------------------------------
    def forward(self, x, training):
        self._begin_forward(x, training)
        self._eval_input = None if training else x
        return self._run_copies(x, training, fold=not training)

    def _run_copies(self, x, training, fold):
        """The copies one after the other from x; returns the last one's output. Each copy: the shortcut,
        then the body, then the add (+ ReLU) in one pass into the copy's buffer. With ``fold``
        (evaluation), a body ending in conv + batch norm lets that convolution (batch norm folded in)
        add the shortcut and apply the ReLU as it writes each output row: no pass of the add's own."""
        relu = self.activation == "relu"
        for r, (body, short) in enumerate(self._runs):
            y = self._buffer(f"y{r}", (x.shape[0], *self.copy_shapes[r][1]))
            last = body[-1] if fold and body and _ends_in_conv_batchnorm(body[-1]) else None
            s = x
            for block in short or ():
                s = block.forward(s, training)
            s = np.ascontiguousarray(s, self.dtype)
            b = x
            for block in body[:-1] if last is not None else body:
                b = block.forward(b, training)
            if last is not None:
                last.folded_forward(b, y, residual=s, relu=relu)
            else:
                (kernels.add_relu_forward if relu else kernels.add_forward)(np.ascontiguousarray(b, self.dtype), s, y)
            x = y
        return x

    def backward(self, dy, need_input_grad=True):
        dy = self._check_dy(dy)
        if not self.training:  # after an evaluation forward (rare): each block's own forward, which the
            self._run_copies(self._eval_input, False, fold=False)  # fold skips, for its backward
        relu = self.activation == "relu"
        last = len(self._runs) - 1
        if relu:  # the gradient through the last copy's ReLU, read from its output
            g = self._buffer(f"g{last}", dy.shape)
            kernels.relu_mask_backward(self._scratch[f"y{last}"], dy, g)
        else:
            g = dy
        for r in range(last, -1, -1):
            body, short = self._runs[r]
            need = need_input_grad or r > 0
            db = g
            for k in range(len(body) - 1, -1, -1):
                db = body[k].backward(db, need_input_grad=need or k > 0)
            ds = g
            for k in range(len(short or ()) - 1, -1, -1):
                ds = short[k].backward(ds, need_input_grad=need or k > 0)
            if not need:
                return None
            db, ds = np.ascontiguousarray(db, self.dtype), np.ascontiguousarray(ds, self.dtype)
            if r == 0:  # the block's input gradient dx = dx_body + dx_shortcut, in a buffer of its own
                dx = self._buffer("dx", (dy.shape[0], *self.copy_shapes[0][0]))
                kernels.add_forward(db, ds, dx)
                return dx
            # Copy r's input gradient is copy r-1's output gradient: the add and copy r-1's ReLU mask in
            # one pass, into a buffer of the block's own (never into db or ds: a branch may hand back g).
            g = self._buffer(f"g{r - 1}", db.shape)
            if relu:
                kernels.add_relu_mask_backward(db, ds, self._scratch[f"y{r - 1}"], g)
            else:
                kernels.add_forward(db, ds, g)
        return None  # not reached: copy 0 returns

    # -- ONNX ------------------------------------------------------------------
    def onnx_nodes(self, graph, x):
        """Per copy: Add(body(x), shortcut(x) or x), then Relu (activation relu); sub-layer tensors named
        after their keys (``layers.3.0.body.1.weight``)."""
        for r, (body, short) in enumerate(self.copies):
            b = x
            for j, layer in enumerate(body):
                b = graph.layer(layer, b, f"{r}.body.{j}", f"body[{j}]")
            s = x
            for j, layer in enumerate(short):
                s = graph.layer(layer, s, f"{r}.shortcut.{j}", f"shortcut[{j}]")
            x = graph.node("Add", [b, s])
            if self.activation == "relu":
                x = graph.node("Relu", [x])
        return x

    # -- PyTorch twin --------------------------------------------------------
    def torch_module(self, torch):
        nn = torch.nn
        relu = self.activation == "relu"

        class ResidualCopy(nn.Module):
            """activation(body(x) + shortcut(x)); state-dict keys body.<j>.*, shortcut.<j>.*."""

            def __init__(self, body, short):
                super().__init__()
                self.body = nn.Sequential(*[layer.torch_module(torch) for layer in body])
                self.shortcut = nn.Sequential(*[layer.torch_module(torch) for layer in short]) if short else None

            def forward(self, x):
                y = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
                return torch.relu(y) if relu else y

        # Keys <r>.body.<j>.*: fastcnn's (with torch's names and layouts for the tensors).
        return nn.Sequential(*[ResidualCopy(body, short) for body, short in self.copies])
