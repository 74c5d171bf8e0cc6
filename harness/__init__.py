"""Drives the real ComfyUI for the demo and the tests: boot it in process, run workflows through its
own validation and executor, start it as a server, and build tiny models for it."""
