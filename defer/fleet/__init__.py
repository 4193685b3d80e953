"""Working with a real fleet: `defer profile` (profile.py: each node times the model's ops,
the links are timed; writes cluster.json) and `defer doctor` (doctor.py: can this chain
start on these nodes?).

It sits beside `defer.local`, above the compiler and the runtime: profiling prepares the model
with the compiler (where the model is) and talks to nodes over the runtime's probe
connections. `doctor` needs only the runtime and the manifest.
"""
