"""Plan fused blocks from a layer list.

A block runs one or more consecutive layers in fewer passes over memory
(e.g. ReLU + max-pool in one kernel). Blocks hold no parameters of their own:
they use the layers' Parameter objects and buffers, so state-dict keys,
gradients and results equal those of the unfused layers.

For now every layer is its own block.
"""


def plan_blocks(layers):
    """[block, ...] covering ``layers`` in order; a block has forward(x, training) and
    backward(dy, need_input_grad)."""
    return list(layers)
