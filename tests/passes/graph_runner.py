"""Run a Graph in a Relax VM (unscheduled: the test models are tiny) and zero channel classes."""

import numpy as np


def run_graph(graph, *inputs) -> np.ndarray:
    import tvm
    from tvm import relax

    ex = tvm.compile(graph.bound_module(), target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(x)) for x in inputs])
    while not hasattr(out, "numpy"):
        out = out[0]
    return out.numpy()


def zero_channels(graph, analysis, removed):
    """The graph with every parameter slice of the given channel classes set to zero: those
    channels then carry exactly zero (filters, biases and BN γ/β zero), so removing them must
    not change the output."""
    params = {}
    for name, value in graph.params.items():
        value = value.copy()
        for axis, labels in enumerate(analysis.param_labels[name]):
            dead = np.setdiff1d(np.arange(len(labels)), analysis.keep_indices(labels, removed))
            index = [slice(None)] * value.ndim
            index[axis] = dead
            value[tuple(index)] = 0
        params[name] = value
    return graph.replace(params=params)
