"""A tiny kubelet that runs the containers of the pods bound to its Node as local processes.

There is no container runtime on the machines Troupe is tested on, and kwok
only fakes nodes. The process node registers one real Node and runs each
container's ``command``/``args`` as a plain process, so the operator's pods
really run. See ``runtime`` for the contract container authors rely on.
"""
