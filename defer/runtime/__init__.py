"""The defer runtime: what runs on and talks to edge nodes (no compiler, no TensorFlow).

protocol (sans-IO frames) · codecs (per-tensor) · channel (asyncio streams of frames) ·
node (`defer serve`) · dispatcher (`Dispatcher`) · cluster (`defer run`) · report · inputs.
"""
